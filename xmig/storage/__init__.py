"""Disk migration (DESIGN.md, issue 3 §3): bulk copy, asynchronous I/O mirror, apply.

- :mod:`xmig.storage.disk` -- the protocols (BlockBackend, WriteHook);
- :mod:`xmig.storage.raw` -- :class:`RawFileBackend`, a raw image file;
- :mod:`xmig.storage.nbd` -- :class:`NbdServer`, the interception point guests write to;
- :mod:`xmig.storage.nbdclient` -- :class:`NbdClient`, the reference guest's disk;
- :mod:`xmig.storage.mirror` -- :class:`MirrorQueue`, the bounded mirror (sans-IO);
- :mod:`xmig.storage.bulk` -- :class:`BulkPlanner`, holes and zero blocks skipped (sans-IO);
- :mod:`xmig.storage.apply` -- :class:`DiskApplier`, the destination's writes and fencing;
- :mod:`xmig.storage.wire` -- the messages on the disk channels;
- :mod:`xmig.storage.engine` -- :class:`DiskSender` / :class:`DiskReceiver` (asyncio).
"""

from xmig.storage.engine import DiskProgress, DiskReceiver, DiskSender
from xmig.storage.nbd import NbdServer
from xmig.storage.nbdclient import NbdClient, NbdRequestError
from xmig.storage.raw import RawFileBackend

__all__ = ["DiskProgress", "DiskReceiver", "DiskSender", "NbdClient", "NbdRequestError",
           "NbdServer", "RawFileBackend"]
