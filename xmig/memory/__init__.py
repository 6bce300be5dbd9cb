"""Memory pre-copy: the page engine (DESIGN.md, ``xmig/memory/``).

- :mod:`xmig.memory.guest` — what a guest backend implements (SourceMemory,
  DestinationMemory);
- :mod:`xmig.memory.codec` — pages to MEMORY-channel messages and back (sans-IO);
- :mod:`xmig.memory.precopy` — the downtime prediction and the round decisions (sans-IO);
- :mod:`xmig.memory.sdps` — throttle controllers: SDPS and QEMU's auto-converge (sans-IO);
- :mod:`xmig.memory.engine` — :class:`MemorySender` / :class:`MemoryReceiver` over a
  transport session (asyncio);
- :mod:`xmig.memory.testing` — :class:`ArrayMemory` and a seeded writer, for tests.
"""

from xmig.memory.codec import CodecConfig, CodecStats, EndOfMemory, PageDecoder, PageEncoder
from xmig.memory.engine import (
    FinalReport,
    MemoryReceiver,
    MemorySender,
    Progress,
    ReceiveReport,
    SenderConfig,
    memory_digest,
)
from xmig.memory.guest import PAGE_SIZE, DestinationMemory, SourceMemory
from xmig.memory.precopy import Decision, Figures, PlannerConfig, Verdict, predict_downtime
from xmig.memory.sdps import AutoConverge, ProportionalThrottle, ThrottleController

__all__ = [
    "PAGE_SIZE",
    "AutoConverge",
    "CodecConfig",
    "CodecStats",
    "Decision",
    "DestinationMemory",
    "EndOfMemory",
    "Figures",
    "FinalReport",
    "MemoryReceiver",
    "MemorySender",
    "PageDecoder",
    "PageEncoder",
    "PlannerConfig",
    "Progress",
    "ProportionalThrottle",
    "ReceiveReport",
    "SenderConfig",
    "SourceMemory",
    "ThrottleController",
    "Verdict",
    "memory_digest",
    "predict_downtime",
]
