"""System figures of the node a run trains on, under MLflow's own system-metric names
(``system/cpu_utilization_percentage``, ``system/gpu_0_memory_usage_megabytes`` ...), so the MLflow UI shows
them in its System metrics tab.

Not MLflow's ``SystemMetricsMonitor``: it logs from the process that starts it, straight to the tracking
store. Here the loop runs in a Ray worker on a GPU node, which never talks to the store (on a cluster it
may not reach it), and the driver's process sits on the head node, whose CPU and memory say nothing about
training. So rank 0 samples its own node once per epoch and the figures travel with the epoch's metrics.
"""

from __future__ import annotations

import psutil
import torch


class SystemSampler:
    """``sample()`` -> this node's figures since the previous call: CPU utilization averaged over the
    interval (psutil's non-blocking form), memory in use, and per visible GPU its memory in use and, where
    NVML is available, its utilization."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        psutil.cpu_percent(interval=None)  # starts the interval the first sample averages over

    def sample(self) -> dict[str, float]:
        memory = psutil.virtual_memory()
        figures = {
            "system/cpu_utilization_percentage": psutil.cpu_percent(interval=None),
            "system/system_memory_usage_megabytes": memory.used / 1e6,
            "system/system_memory_usage_percentage": memory.used / memory.total * 100,
        }
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(index)
            figures[f"system/gpu_{index}_memory_usage_megabytes"] = (total - free) / 1e6
            figures[f"system/gpu_{index}_memory_usage_percentage"] = (total - free) / total * 100
            try:
                figures[f"system/gpu_{index}_utilization_percentage"] = float(torch.cuda.utilization(index))
            except Exception:  # no NVML bindings (pynvml) on this node: memory figures only
                pass
        return figures
