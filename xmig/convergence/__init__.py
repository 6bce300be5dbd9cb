"""One convergence controller for memory and disk (issue 10): sans-IO.

:mod:`~xmig.convergence.controller` reads, every interval, what both the page engine (or
QEMU's stream) and the disk mirror measured, predicts the blackout from all of it, and sets
both of the guest's rates: the vCPU throttle and the pace of its disk-write
acknowledgements. It decides SWITCHOVER when the prediction fits the budget, and
NOT_CONVERGING only when even the strongest allowed slowdown cannot fit it.
"""

from xmig.convergence.controller import (
    Control,
    ControllerConfig,
    ConvergenceController,
    Sample,
    Verdict,
)

__all__ = ["Control", "ControllerConfig", "ConvergenceController", "Sample", "Verdict"]
