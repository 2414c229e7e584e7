"""``label``: add a text label to every block of data read, the demo interceptor.

Each call of a data hook is one read of the engine, so the label shows how the
stream was cut into reads. It changes lengths (an HTTP body grows), which is
expected for a demonstration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tproxy.flow import FlowInfo
from tproxy.interceptor import Interceptor
from tproxy.options import CLIENT, SERVER, decode_escapes, normalize, parse_choice, parse_direction


@dataclass(frozen=True)
class LabelOptions:
    """Checked options of :class:`Label`."""

    text: bytes = b"[tproxy] "
    suffix: bool = False
    directions: frozenset[str] = frozenset({SERVER})


class Label(Interceptor):
    """Put ``text`` before (or after) each block of data in the chosen directions.

    Options: ``text`` (default ``"[tproxy] "``, backslash escapes such as
    ``\\n`` allowed), ``position`` ``prefix`` | ``suffix`` (default prefix),
    ``direction`` ``client`` | ``server`` | ``both`` (default ``server``:
    data from the server to the client is labelled).
    """

    options: LabelOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> LabelOptions:
        opts = normalize("label", options, {"text", "position", "direction"})
        result = LabelOptions()
        text = decode_escapes("label", "text", opts["text"]) if "text" in opts else result.text
        suffix = (
            parse_choice("label", "position", opts["position"], ("prefix", "suffix")) == "suffix"
            if "position" in opts
            else False
        )
        directions = (
            parse_direction("label", opts["direction"])
            if "direction" in opts
            else result.directions
        )
        return LabelOptions(text=text, suffix=suffix, directions=directions)

    def __init__(self, flow: FlowInfo, options: LabelOptions | None = None) -> None:
        super().__init__(flow, options if options is not None else LabelOptions())

    def _label(self, data: bytes) -> bytes:
        if self.options.suffix:
            return data + self.options.text
        return self.options.text + data

    def client_data(self, data: bytes) -> bytes:
        return self._label(data) if CLIENT in self.options.directions else data

    def server_data(self, data: bytes) -> bytes:
        return self._label(data) if SERVER in self.options.directions else data
