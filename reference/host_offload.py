"""Layer inputs that "unsloth" checkpointing parks in host memory, copied off the compute stream.

A checkpointed layer's input goes to pinned host memory in the forward and comes back for the layer's replay
in the backward. Issued on the compute stream, those copies wait for the matmuls and the matmuls wait for
them: at Llava-1.5-7B widths (4 x 2,000 tokens, one 65 MB hidden state a layer, ~1.3 ms each way over PCIe)
that was 7.8 ms of device-to-host and 7.7 ms of host-to-device copying in a 156 ms QLoRA step on the H200
(benchmarks/results/finetune-profile-nvidia-h200-novisionbwd/llava-optimized-4bit.txt), every byte of it
on the compute stream. Here both directions run on a side stream, one per device:

- forward: the copy out starts once the compute stream has made the input and runs beside the layer; the
  compute stream waits for it when the layer is done (`settle`), so only the layer itself could race it;
- backward: fetching a layer's input starts the copy back of the input parked just before it, which the
  backward needs next, so that copy runs beside this layer's replay and backward. Only the backward's
  first layer (the forward's last) waits for its own copy.

Ordering is by events and the caching allocator's stream records: the side stream waits for the compute
stream's work before it reads or writes device memory that stream used; the compute stream waits for a
copy's event before it reads what the copy brought; and each device tensor a side-stream copy touches is
recorded on the side stream, so its memory is not handed out again before the copy is done.

Every CUDA call is a method of `Streams`; `tests/simulated_streams.py` stands in for it on the CPU with
copies that complete only when waited for, so a missing wait reads garbage in a test.
"""

from __future__ import annotations

import threading
import weakref

import torch


class Streams:
    """The CUDA calls parking makes, in one place. `overlap=False` issues every copy on the compute stream,
    as fastvision did before 2026-12-08 (benchmarks/finetune_ablation.py times the two)."""

    def __init__(self, overlap: bool = True):
        self.overlap = overlap
        self._side: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def on_device(self, tensor: torch.Tensor) -> bool:
        """Whether the tensor lives in device memory (a CPU tensor is parked as it is)."""
        return tensor.is_cuda

    def host_like(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)

    def device_like(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        return torch.empty(tensor.shape, dtype=tensor.dtype, device=device)

    def compute(self, device: torch.device):
        """The stream the caller's work runs on (not necessarily the default stream)."""
        return torch.cuda.current_stream(device)

    def side(self, device: torch.device):
        """The device's copy stream, made at first use (the compute stream itself without overlap)."""
        if not self.overlap:
            return self.compute(device)
        if device not in self._side:
            with self._lock:
                self._side.setdefault(device, torch.cuda.Stream(device))
        return self._side[device]

    def copy(self, destination: torch.Tensor, source: torch.Tensor, *, on, after):
        """destination <- source on the stream `on`, once the work queued on `after` so far is done; returns
        the copy's event."""
        on.wait_stream(after)
        with torch.cuda.stream(on):
            destination.copy_(source, non_blocking=True)
            done = on.record_event()
        for tensor in (destination, source):
            if tensor.is_cuda:
                tensor.record_stream(on)
        return done

    def wait(self, stream, event) -> None:
        """Work queued on `stream` from now on starts after `event`."""
        stream.wait_event(event)


STREAMS = Streams()


def use_streams(streams: Streams) -> Streams:
    """Parking's CUDA calls from now on, for every model of this process; returns the ones used until now."""
    global STREAMS
    previous, STREAMS = STREAMS, streams
    return previous


class Kept:
    """A layer input already in host memory: parked as it is (a copy would only double it)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()

    def settle(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def fetch(self) -> torch.Tensor:
        # A fresh alias a call: the replay sets requires_grad on it and reads its .grad, which a graph kept for a
        # second backward would otherwise find holding the first backward's gradient (3x instead of 2x).
        return self.tensor.detach()


class Parked:
    """A device tensor's copy in pinned host memory, and the way back to the device."""

    def __init__(self, tensor: torch.Tensor, previous: weakref.ref | None, streams: Streams):
        self.device, self.streams, self.previous = tensor.device, streams, previous
        self._source, self._version = weakref.ref(tensor), tensor._version  # for settle
        self.host = streams.host_like(tensor)
        self._out = streams.copy(self.host, tensor.detach(), on=streams.side(self.device),
                                 after=streams.compute(self.device))
        self._back = None  # (device tensor, event) while a copy back is under way

    def settle(self) -> None:
        """Called when the layer that got the tensor is done: work queued on the compute stream from now on
        (which may write the tensor or reuse its memory) waits for the copy out, and a layer that wrote its
        own input in place, racing the copy, is an error rather than a wrong gradient."""
        self.streams.wait(self.streams.compute(self.device), self._out)
        source, self._source = self._source(), None
        if source is not None and source._version != self._version:
            raise RuntimeError(
                "fastvision: a checkpointed layer modified its own input in place while the input was being "
                "copied to host memory (use_gradient_checkpointing=\"unsloth\"), so the copy may hold either "
                "version. Use use_gradient_checkpointing=True for this model."
            )

    def prefetch(self) -> None:
        """Start the copy back to the device, unless it is under way."""
        if self._back is None:
            # A fresh block may still be in use by work queued on the compute stream: the copy waits for it.
            target = self.streams.device_like(self.host, self.device)
            event = self.streams.copy(target, self.host, on=self.streams.side(self.device),
                                      after=self.streams.compute(self.device))
            self._back = (target, event)

    def fetch(self) -> torch.Tensor:
        """The tensor on its device, for work queued on the compute stream from now on; starts bringing back
        the input parked before this one. Each call brings a fresh copy (a graph kept for a second backward
        replays the layer again)."""
        self.prefetch()
        (target, event), self._back = self._back, None
        previous = self.previous() if self.previous is not None else None
        if previous is not None:
            previous.prefetch()
        self.streams.wait(self.streams.compute(self.device), event)
        return target


_newest = threading.local()  # the last input parked on this thread: the next one's `previous`


def park(tensor: torch.Tensor) -> Parked | Kept:
    """The tensor put in host memory (copied from a device, kept as it is from the CPU)."""
    streams = STREAMS
    if not streams.on_device(tensor):
        return Kept(tensor)
    parked = Parked(tensor, getattr(_newest, "ref", None), streams)
    _newest.ref = weakref.ref(parked)
    return parked


__all__ = ["STREAMS", "Kept", "Parked", "Streams", "park", "use_streams"]
