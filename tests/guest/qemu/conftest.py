"""Fixtures of the QEMU guest tests: the test guest image, built once (cached on disk).

The image is built in the repository's ``build/guest`` (what ``make guest-image`` builds, and
``.ci/run`` before the tests), or in ``$XMIG_GUEST_BUILD``. These tests need QEMU, gcc and
busybox-static (``.ci/run`` installs them): when they are missing the tests fail, not skip.
"""

from __future__ import annotations

import pytest

from xmig.guest.qemu.image import GuestImage, build_test_guest

from .helpers import guest_build_dir


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_test_guest(guest_build_dir())
