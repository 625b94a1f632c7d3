"""The public math API: one function per primitive, several backends behind each.

`backend=None` picks the fastest implementation that runs here; "reference" is the
textbook recurrence every other backend is tested against.
"""
from megarnn.ops.attention import sliding_window_attention
from megarnn.ops.conv import causal_conv1d
from megarnn.ops.delta_rule import gated_delta_product, gated_delta_rule
from megarnn.ops.gla import gla
from megarnn.ops.log_scan import log_linear_scan
from megarnn.ops.lru import lru_scan
from megarnn.ops.newton import NewtonCell, newton_solve
from megarnn.ops.scan import linear_scan, linear_scan_reference
from megarnn.ops.ssd import ssd_scan

__all__ = ["linear_scan", "linear_scan_reference", "ssd_scan", "causal_conv1d", "newton_solve", "NewtonCell", "sliding_window_attention", "gla",
           "gated_delta_rule", "lru_scan", "log_linear_scan"]
