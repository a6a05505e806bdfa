"""
The cuda_graph backend: the network captured into CUDA graphs, one per batch size.

The network, under its autocast precision, is captured once per batch size into a CUDA graph
with static input and output buffers, so a frame costs one graph launch instead of hundreds
of kernel launches. Camera frames of a fixed size go through a second kind of graph that also
holds the preprocessing (`preprocess.frames_to_input`: uint8 HxWx3 -> float, resize,
normalise), fed from a pinned staging buffer by one non-blocking copy. The compile backend
(torch_compile.py) on CUDA captures its compiled network the same way (`compiled=True`).

Batches of any size are accepted: a batch of a size not captured is padded up to the next
captured size (every operation of the network in eval mode is per image, so padding rows never
change real rows) or cut into chunks.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.inference.base import (BuildRequest, compile_module, DEFAULT_BATCH_SIZES,
                                      FastPathError, NetworkUnderAutocast)
from taco_cvgl.model.preprocess import frames_to_input, mean_std
import torch
import torch.nn as nn


class FrameNetwork(nn.Module):
    """
    Preprocessing and network in one: uint8 BxHxWx3 frames -> float32 BxD embeddings.

    The preprocessing is `preprocess.frames_to_input`, so the embeddings equal those of
    `model.encode_batch` on the same frames.
    """

    def __init__(self, network: NetworkUnderAutocast, config, color_order: str = 'rgb'):
        """Wrap a `NetworkUnderAutocast`; color_order is that of the frames' last axis."""
        super().__init__()
        if color_order not in ('rgb', 'bgr'):
            raise InputError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")
        self.network = network
        self.config = config
        self.color_order = color_order
        # Made once on the device: a CUDA graph cannot capture the host-to-device copies that
        # normalize would make of these constants on each call.
        mean, std = mean_std(config, network.device_)
        self.register_buffer('mean', mean)
        self.register_buffer('std', std)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Embed a uint8 BxHxWx3 batch on the device."""
        x = frames_to_input(frames, self.config, self.color_order, (self.mean, self.std))
        return self.network(x)


class CudaGraphs:
    """
    CUDA graphs of one function, captured lazily per input shape, with static buffers.

    `run(x)` copies x into the static input of the graph for its shape (padding the batch up to
    a captured size), replays the graph and returns a copy of the static output. Calls are
    serialised by a lock: one set of static buffers serves every caller.
    """

    warmup_runs = 3

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 channels_last: bool = False):
        """fn: tensor -> tensor, deterministic in shape; batch_sizes: sizes to capture."""
        self.fn = fn
        self.device = device
        self.batch_sizes = sorted({int(b) for b in batch_sizes if int(b) >= 1}) or [1]
        self.channels_last = channels_last
        self.graphs: Dict[tuple, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.lock = threading.Lock()

    def _capture(self, shape: tuple, dtype: torch.dtype) -> tuple:
        static_in = torch.zeros(shape, dtype=dtype, device=self.device)
        if self.channels_last and len(shape) == 4:
            static_in = static_in.contiguous(memory_format=torch.channels_last)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(self.warmup_runs):  # cuDNN/cuBLAS choose kernels, inductor compiles
                self.fn(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(static_in)
        torch.cuda.synchronize(self.device)
        return graph, static_in, static_out

    def entry(self, batch: int, tail: tuple, dtype: torch.dtype) -> tuple:
        """Return (graph, static_in, static_out) for a captured batch size (capturing it)."""
        key = (batch, tail, dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture((batch,) + tail, dtype)
        return self.graphs[key]

    def padded_size(self, n: int) -> int:
        """Return the captured batch size that serves n images (n itself when above all)."""
        for b in self.batch_sizes:
            if b >= n:
                return b
        return self.batch_sizes[-1]

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Run fn(x) through the graphs; x on the device (or pinned memory), any batch size."""
        n = x.shape[0]
        top = self.batch_sizes[-1]
        if n > top:
            return torch.cat([self.run(x[i:i + top]) for i in range(0, n, top)])
        graph, static_in, static_out = self.entry(self.padded_size(n), tuple(x.shape[1:]),
                                                  x.dtype)
        with self.lock:
            static_in[:n].copy_(x, non_blocking=True)
            graph.replay()
            return static_out[:n].clone()


class PinnedStaging:
    """Pinned host buffers for uint8 frames, reused, so uploads are one non-blocking copy."""

    def __init__(self):
        """Start with no buffer (they are made per frame shape on first use)."""
        self.buffers: Dict[tuple, Tuple[torch.Tensor, Optional[torch.cuda.Event]]] = {}

    def fill(self, frames: Sequence[np.ndarray], shape: tuple) -> torch.Tensor:
        """Copy same-shape HxWx3 uint8 arrays into a pinned Bx HxWx3 tensor and return it."""
        key = (len(frames),) + tuple(shape)
        buffer, pending = self.buffers.get(key, (None, None))
        if buffer is None:
            buffer = torch.empty(key, dtype=torch.uint8).pin_memory()
        elif pending is not None:
            pending.synchronize()  # the previous upload from this buffer has finished
        view = buffer.numpy()
        for i, frame in enumerate(frames):
            np.copyto(view[i], frame)
        self.buffers[key] = (buffer, None)
        return buffer

    def uploaded(self, buffer: torch.Tensor) -> None:
        """Record that an upload from `buffer` was queued on the current stream."""
        event = torch.cuda.Event()
        event.record()
        self.buffers[tuple(buffer.shape)] = (buffer, event)


class CudaGraphRunner:
    """CUDA graphs of the (optionally compiled) network and of frame networks."""

    def __init__(self, network: NetworkUnderAutocast, config, batch_sizes: Sequence[int],
                 compiled: bool):
        """Capture lazily: each batch size and frame shape on its first call (or warm_up)."""
        if network.device_.type != 'cuda':
            raise FastPathError('CUDA graphs need a CUDA device')
        self.name = 'compile' if compiled else 'cuda_graph'
        self.config = config
        self.batch_sizes = batch_sizes
        self.wrap = compile_module if compiled else (lambda module: module)
        self.network = network
        self.graphs = CudaGraphs(self.wrap(network), network.device_, batch_sizes,
                                 channels_last=True)
        self.frame_graphs: Dict[str, CudaGraphs] = {}
        self.staging = PinnedStaging()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch on the device."""
        return self.graphs.run(x.float())

    def frames(self, frames: Sequence[np.ndarray], color_order: str) -> torch.Tensor:
        """Embed same-shape uint8 HxWx3 arrays through a frame graph."""
        graphs = self.frame_graphs.get(color_order)
        if graphs is None:
            net = FrameNetwork(self.network, self.config, color_order)
            graphs = CudaGraphs(self.wrap(net), self.network.device_, self.batch_sizes)
            self.frame_graphs[color_order] = graphs
        shape = frames[0].shape
        out = []
        top = graphs.batch_sizes[-1]
        for start in range(0, len(frames), top):
            chunk = frames[start:start + top]
            host = self.staging.fill(chunk, shape)
            device = host.to(self.network.device_, non_blocking=True)
            self.staging.uploaded(host)
            out.append(graphs.run(device))
        return out[0] if len(out) == 1 else torch.cat(out)


def build(request: BuildRequest) -> CudaGraphRunner:
    """Return CUDA graphs of the request's network (FastPathError off CUDA)."""
    return CudaGraphRunner(request.network, request.config, request.batch_sizes, False)
