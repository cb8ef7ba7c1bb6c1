"""Experiment tracking behind one door.

``pipeline.tracking.mlflow_tracker`` is the only module in the code base that imports mlflow; importing this
package does not import it, so code that never tracks never pays mlflow's import time.
"""
