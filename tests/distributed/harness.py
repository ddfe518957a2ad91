"""Two CPU processes (gloo) that compile a tensor-parallel model with sparsecc: the model, the spawn, the cases.

Every case runs in both processes of one spawn (starting processes costs more than the cases): each compiles the
model parallelised with PyTorch's ``parallelize_module`` (column-wise q/k/v/gate/up, row-wise o/down) and the
same model unsharded, with one spec, and records the outputs, its report and the weights sparsecc bound. The
tests (``test_tensor_parallel.py``) compare what both ranks recorded.
"""

from __future__ import annotations

import datetime
import inspect
import os
import pickle
import shutil
import sys
import time
import traceback
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.zoo import GatedSiluFFN

HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, LAYERS = 64, 4, 2, 128, 2
HEAD_DIM = HIDDEN // HEADS
BATCH, SEQ = 2, 32
WORLD = 2


class Attention(nn.Module):
    """Llama's attention without rotary embeddings: heads from ``view(..., -1, head_dim)``, GQA by SDPA."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        # -1, as HF models write it: under tensor parallelism this rank's projection holds fewer heads.
        q = self.q_proj(x).view(b, s, -1, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, HEAD_DIM).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = Attention(), GatedSiluFFN(HIDDEN, INTERMEDIATE)   # Llama's gated SiLU FFN

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class TinyLlama(nn.Module):
    """Two Llama-like layers on embeddings ``[B, S, HIDDEN]``; module paths ``layers.{i}.attn.q_proj``, ..."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def build(seed: int = 0) -> TinyLlama:
    """The model, with the same weights in every process."""
    torch.manual_seed(seed)
    return TinyLlama().eval()


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(seed))


def tp_plan() -> dict:
    """PyTorch's TP tutorial plan (HF's Llama ``base_model_tp_plan``): column-wise in, row-wise out."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    plan = {}
    for i in range(LAYERS):
        for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("attn.o_proj", "mlp.down_proj"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    return plan


def build_llama(seed: int = 0):
    """A 2-layer ``LlamaForCausalLM`` of transformers (rotary embeddings, its own attention code)."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def llama_plan() -> dict:
    """The same plan under the paths of HF's Llama (``model.layers.{i}.self_attn.q_proj``, ...)."""
    return {f"model.{path}".replace(".attn.", ".self_attn."): style for path, style in tp_plan().items()}


MODELS = {"tiny": (build, tp_plan, lambda: inputs()),
          "llama": (build_llama, llama_plan,
                    lambda: torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(1)))}


def site_rows(report) -> list:
    """The report's sites as plain dicts (picklable, compared across ranks)."""
    return [dict(kind=s.kind, module=s.module, applied=s.applied, reason=s.reason, form=s.form,
                 detail=s.form_detail, shapes=s.shapes, attrs=dict(s.attrs)) for s in report.sites]


def compile_and_run(model, spec, x, lowering: str = "eager"):
    """Compile ``model`` with sparsecc and ``spec``; return (output, report rows, the weights bound by this compile
    as {qualname: (form name, {field: tensor})}). ``lowering="inductor"`` lowers the rewritten graph with
    Inductor, as in use; "eager" runs it as it is (faster to compile; the numerics of the rewrites)."""
    import sparsecc
    from sparsecc.backend import reset_reports
    from sparsecc.weights import live_bindings

    torch._dynamo.reset()
    reset_reports()
    before = {id(b) for b in live_bindings()}
    os.environ["SPARSECC_LOWERING"] = lowering
    with torch.no_grad():
        out = torch.compile(model, backend="sparsecc", options={"spec": spec})(x)
    bound = {b.qualname: (getattr(b.form, "name", None), dict(zip(b.fields, (t.clone() for t in b.tensors))))
             for b in live_bindings() if id(b) not in before}
    return out, site_rows(sparsecc.last_report()), bound


def run_case(spec, mesh, with_report: bool = False, model: str = "tiny", lowering: str = "eager") -> dict:
    """The case's spec on the parallel model (lowered by ``lowering``) and on the unsharded one; the outputs,
    reports and bound weights."""
    from torch.distributed.tensor.parallel import parallelize_module
    import sparsecc

    factory, plan, make_inputs = MODELS[model]
    x = make_inputs()
    ref, ref_sites, ref_bound = compile_and_run(factory(), spec, x)
    parallel = parallelize_module(factory(), mesh, plan())
    with torch.no_grad():
        eager = parallel(x)
    out, sites, bound = compile_and_run(parallel, spec, x, lowering)
    if model == "llama":
        eager, out, ref = eager.logits, out.logits, ref.logits
    result = dict(out=out, ref=ref, eager=eager, sites=sites, ref_sites=ref_sites, bound=bound, ref_bound=ref_bound)
    if with_report:
        combined = sparsecc.gather_reports()
        result["combined"] = site_rows(combined) if combined is not None else None
    return result


def _auto_tp(transformers) -> dict:
    """``from_pretrained``'s keyword for the model's own plan: ``distributed_config=DistributedConfig(tp_plan="auto")``
    where transformers' top-level ``DistributedConfig`` takes a ``tp_plan`` (``tp_plan=`` is deprecated there, to be
    removed), ``tp_plan="auto"`` where it does not (5.0.0 has no such export)."""
    config = getattr(transformers, "DistributedConfig", None)
    if config is not None and "tp_plan" in inspect.signature(config).parameters:
        return {"distributed_config": config(tp_plan="auto")}
    return {"tp_plan": "auto"}


def hf_auto_case(spec, mesh) -> dict:
    """transformers' own tensor parallelism (its "auto" plan, :func:`_auto_tp`) against the unsharded model."""
    import tempfile
    import torch.distributed as dist
    import transformers

    rank = dist.get_rank()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    # transformers saves on rank 0 only: one folder for both ranks
    folder = [tempfile.mkdtemp(prefix="tp-llama-") if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    folder = folder[0]
    model = build_llama()
    model.save_pretrained(folder)
    dist.barrier()
    x = MODELS["llama"][2]()
    ref, ref_sites, _ = compile_and_run(model, spec, x)
    parallel = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa",
                                                             **_auto_tp(transformers))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    out, sites, _ = compile_and_run(parallel.eval(), spec, x)
    weight = parallel.model.layers[0].self_attn.q_proj.weight
    return dict(out=out.logits, ref=ref.logits, sites=sites, ref_sites=ref_sites,
                sharded=type(weight).__name__ == "DTensor")


def _fresh_weights(seed: int, names=lambda name: True) -> dict:
    """New values (scale 0.05) for the parameters of :func:`build` whose names ``names`` accepts."""
    return {name: 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + i))
            for i, (name, p) in enumerate(build().named_parameters()) if names(name)}


def _compile_write_run(model, spec, mesh, x, fresh: dict, refresh: bool):
    """Compile ``model``, run it, write ``fresh`` into its parameters on every rank, run it again: (before, after,
    applied per site, bindings rebuilt). Without ``refresh`` the writes go through the parameters (as
    ``load_state_dict`` does); with it they bypass them (``p.data``: no version bump) and ``sparsecc.refresh``
    follows (rebuilt -1 when it raises). ``after`` is the error text when a step raises."""
    from torch.distributed.tensor import distribute_tensor
    import sparsecc

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsecc", options={"spec": spec})
    rebuilt = None
    with torch.no_grad():
        before = compiled(x)
        applied = [s.applied for s in sparsecc.last_report().sites]
        for name, p in model.named_parameters():
            if name in fresh:
                value = distribute_tensor(fresh[name], mesh, p.placements) if hasattr(p, "placements") \
                    else fresh[name]
                (p.data if refresh else p).copy_(value)
        try:
            if refresh:
                rebuilt = -1
                rebuilt = sparsecc.refresh(compiled)
            after = compiled(x)
        except Exception as err:  # noqa: BLE001 - the test reads the message
            after = str(err)
    return before, after, applied, rebuilt


def update_case(spec, moving_spec, mesh) -> dict:
    """Weights updated after compile: pruned anew with the unsharded rule (``spec``); with ``moving_spec`` the
    update moves kept blocks between ranks, which the compiled graph cannot hold."""
    from torch.distributed.tensor.parallel import parallelize_module

    x = inputs()
    fresh = _fresh_weights(7, lambda name: ".mlp." in name)
    ref_before, ref, ref_applied, _ = _compile_write_run(build(), spec, mesh, x, fresh, refresh=False)
    out_before, out, applied, _ = _compile_write_run(parallelize_module(build(), mesh, tp_plan()), spec, mesh, x,
                                                     fresh, refresh=False)
    moved = _compile_write_run(parallelize_module(build(), mesh, tp_plan()), moving_spec, mesh, x, fresh,
                               refresh=False)[1]
    return dict(out=out, ref=ref, out_before=out_before, ref_before=ref_before, applied=applied,
                ref_applied=ref_applied, moved=moved if isinstance(moved, str) else None)


def refresh_weights() -> dict:
    """What the refresh case writes: new values for every weight, a q_proj block among them all zeros."""
    fresh = _fresh_weights(11)
    fresh["layers.0.attn.q_proj.weight"][32:64, 0:32] = 0.0   # a block the spec keeps (density 1), now all zeros
    return fresh


def refresh_case(spec, mesh) -> dict:
    """``sparsecc.refresh`` after writes that bypass the parameters: every rank rebuilds its bindings in one order
    (each rebuild gathers the whole weight), and a kept all-zero block stays in its rank's share."""
    from torch.distributed.tensor.parallel import parallelize_module

    x = inputs()
    fresh = refresh_weights()
    ref_before, ref, ref_applied, ref_rebuilt = _compile_write_run(build(), spec, mesh, x, fresh, refresh=True)
    out_before, out, applied, rebuilt = _compile_write_run(parallelize_module(build(), mesh, tp_plan()), spec, mesh,
                                                           x, fresh, refresh=True)
    return dict(out=out, ref=ref, out_before=out_before, ref_before=ref_before, applied=applied,
                ref_applied=ref_applied, rebuilt=rebuilt, ref_rebuilt=ref_rebuilt)


def calibration_case(spec, mesh) -> dict:
    """calibrate() on the unsharded model, its spec on both models; calibrate() on the parallel model refuses."""
    from torch.distributed.tensor.parallel import parallelize_module
    import sparsecc

    batches = [inputs(seed) for seed in (5, 6)]
    calibrated = sparsecc.calibrate(build(), batches, spec, progress=False)
    result = run_case(calibrated, mesh)
    try:
        sparsecc.calibrate(parallelize_module(build(), mesh, tp_plan()), batches, spec, progress=False)
        result["tp_calibrate_error"] = None
    except ValueError as err:
        result["tp_calibrate_error"] = str(err)
    return result


def _worker(rank: int, rendezvous: str, out_dir: str, cases: Dict[str, Callable]) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for name, case in cases.items():
        start = time.perf_counter()
        try:
            results[name] = case(mesh)
        except Exception:  # noqa: BLE001 - the test reports it with its case
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(results, fh)
    dist.barrier()   # every rank is done communicating before any tears down
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: objects still holding the destroyed groups (the device mesh) are
    # freed there in any order, and one CI run saw a rank abort at that point (torch 2.13, gloo: SIGABRT,
    # "terminate called without an active exception") after its results were written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def records(ranks: list, name: str) -> list:
    """Every rank's record of case ``name``; fails with a rank's traceback when the case raised there."""
    out = [r[name] for r in ranks]
    for rank, record in enumerate(out):
        assert "error" not in record, f"rank {rank}:\n{record['error']}"
    return out


def spawn(cases: Dict[str, Callable], tmp_dir: str, timeout_s: float = 240.0) -> list:
    """Run ``cases`` (name -> fn(mesh) -> picklable dict) on ``WORLD`` processes; return each rank's results."""
    import torch.multiprocessing as mp

    context = mp.spawn(_worker, args=(os.path.join(tmp_dir, "rendezvous"), tmp_dir, cases), nprocs=WORLD,
                       join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"the {WORLD} processes did not finish within {timeout_s} s")
    out = []
    for rank in range(WORLD):
        with open(os.path.join(tmp_dir, f"rank{rank}.pkl"), "rb") as fh:
            out.append(pickle.load(fh))
    return out
