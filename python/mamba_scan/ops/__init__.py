from .selective_scan import SelectiveScanFn, selective_scan_fn

__all__ = ["SelectiveScanFn", "selective_scan_fn"]
