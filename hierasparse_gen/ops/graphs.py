"""CUDA-graph capture of a step (decode steps, the HF integration's graphed decoder)."""

from __future__ import annotations

import torch


def capture_graph(step):
    """Run ``step()`` once on a side stream (a real call, which also warms the allocator up),
    then capture a second call in a CUDA graph. Returns (graph, warm-up result, captured result);
    the captured result's tensors are rewritten by every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, warm, captured
