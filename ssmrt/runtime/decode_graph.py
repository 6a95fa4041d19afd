"""The torch backend's decode step from static buffers, captured in a CUDA graph.

A decode step of a small model is launch-bound (hundreds of small kernels for ~0.1 ms of weight reads), so
the step for one batch size is captured once and replayed: the token ids are copied into a static buffer,
the state lives in static buffers that the kernels update in place, and the logits land in a static buffer.

The state a step returns *is* those buffers (a StaticState list). Feeding it back costs nothing; feeding any
other state copies it in first. A later step of the same graph overwrites the buffers, so a StaticState from
before it is stale and refused rather than silently read with another sequence's contents: keep a state
across other steps with runner.copy(state) (Session.snapshot does).
"""

from __future__ import annotations

from ..artifact import flatten_states, pair_states

MODES = ("eager", "static", "cuda_graph")


class StaticState(list):
    """A state list aliasing a step graph's buffers, valid until that graph's next step."""

    def __init__(self, tensors, graph, version):
        super().__init__(tensors)
        self.graph = graph
        self.version = version


class StepGraph:
    """The decode step (seqlen 1) of `model` for one batch size.

    mode "cuda_graph" captures it (CUDA only); "static" runs the same step from the same static buffers
    eagerly, which is what the capture records: it lets a CPU check everything but the capture itself.
    """

    def __init__(self, model, batch: int, device, mode: str, routes):
        import torch

        if mode not in ("static", "cuda_graph"):
            raise ValueError(f"mode must be 'static' or 'cuda_graph', got {mode!r}")
        self.batch = batch
        self.version = 0
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.state = flatten_states(model.zero_state(batch, device))
        self.logits = None

        def step():
            with routes():
                logits, new = model(self.ids, pair_states(self.state))
            for dst, src in zip(self.state, flatten_states(new), strict=True):
                if src.data_ptr() != dst.data_ptr():  # an op that did not update its state in place
                    dst.copy_(src)
            return logits

        if mode == "static":
            self._run = lambda: setattr(self, "logits", step())
            return
        # Warm up on a side stream (Triton compiles its kernels, torch settles its workspaces), then capture.
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self.logits = step()
        self._run = graph.replay

    def __call__(self, ids, state: list):
        """One step: ids (batch, 1) int64 tensor, state a flat list -> (logits (batch, 1, vocab), StaticState)."""
        import torch

        if isinstance(state, StaticState) and state.graph is self:
            if state.version != self.version:
                raise RuntimeError(
                    "this state is stale: a later decode step of the same batch size overwrote its buffers; "
                    "keep a state across other steps with runner.copy(state)")
        else:
            for dst, src in zip(self.state, state, strict=True):
                dst.copy_(src)
        self.ids.copy_(ids)
        with torch.no_grad():
            self._run()
        self.version += 1
        return self.logits, StaticState(self.state, self, self.version)
