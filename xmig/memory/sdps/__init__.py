"""SDPS (Stun During Page Send): throttle controllers for the vCPUs of a migrating guest."""

from xmig.memory.sdps.autoconverge import AutoConverge
from xmig.memory.sdps.base import MAX_THROTTLE, ThrottleController
from xmig.memory.sdps.proportional import DEFAULT_ALPHA, ProportionalThrottle

__all__ = ["DEFAULT_ALPHA", "MAX_THROTTLE", "AutoConverge", "ProportionalThrottle",
           "ThrottleController"]
