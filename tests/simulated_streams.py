"""A CPU stand-in for `reference.host_offload.Streams`, for the tests of parked layer inputs.

Every tensor counts as device memory; a copy runs only when the compute stream waits for its event (the
latest a real copy may finish), reading its source then, as a real copy does; and fresh buffers hold NaN
(what uninitialised memory may hold). A read that skipped a wait therefore sees NaN, and a source written
before the copy ran is copied as written.
"""

from __future__ import annotations

import torch

from reference import host_offload

COMPUTE, SIDE = "compute", "side"


def _garbage_like(tensor: torch.Tensor) -> torch.Tensor:
    fill = float("nan") if tensor.is_floating_point() else -1
    return torch.full(tensor.shape, fill, dtype=tensor.dtype)


class SimulatedStreams(host_offload.Streams):
    def __init__(self):
        super().__init__()
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # copies issued and not yet run
        self.issued: list[str] = []  # "out" (to the host) or "back" (to the device), in issue order
        self._events = 0
        self._host_buffers: list[torch.Tensor] = []

    def on_device(self, tensor):
        return True

    def host_like(self, tensor):
        self._host_buffers.append(_garbage_like(tensor))
        return self._host_buffers[-1]

    def device_like(self, tensor, device):
        return _garbage_like(tensor)

    def compute(self, device):
        return COMPUTE

    def side(self, device):
        return SIDE

    def copy(self, destination, source, *, on, after):
        assert (on, after) == (SIDE, COMPUTE), "copies run on the side stream, after the compute stream's work"
        self._events += 1
        self.pending.append((self._events, destination, source))
        self.issued.append("back" if any(source is host for host in self._host_buffers) else "out")
        return self._events

    def wait(self, stream, event):
        assert stream == COMPUTE
        while self.pending and self.pending[0][0] <= event:  # one stream: copies finish in issue order
            _, destination, source = self.pending.pop(0)
            destination.copy_(source)
