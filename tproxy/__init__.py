"""tproxy: a transparent-proxy interception framework for Linux, on trio."""

from .flow import EndReason, FlowInfo
from .interceptor import AbortFlow, Chain, Interceptor, InterceptorError, OptionError, Output

__all__ = [
    "AbortFlow",
    "Chain",
    "EndReason",
    "FlowInfo",
    "Interceptor",
    "InterceptorError",
    "OptionError",
    "Output",
]
__version__ = "0.1.0"
