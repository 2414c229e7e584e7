"""``tproxy run --record PATH``: every relayed flow written to pcapng as synthetic TCP.

:class:`Recorder` is sans-io: it is fed what a flow's relay saw (``feed(side,
stage, data)``, then ``end(reason)``) and writes packets to a sink
(:class:`~tproxy.record.pcapng.PcapngWriter`). :class:`Recording` is the
``--record`` option: where files go, the per-flow size cap, and the *tap*
interface the engine uses (:meth:`Recording.tap_for`). Until the relay calls
taps itself, :meth:`Recording.wrap` connects the taps through two recording
interceptors around a flow's chain (see :mod:`tproxy.record.recorder`).
"""

from .recorder import FlowTap, Recorder, Recording, add_arguments

__all__ = ["FlowTap", "Recorder", "Recording", "add_arguments"]
