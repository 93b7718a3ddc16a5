"""`refimpl.load`: a checkpoint in one process (model.load), or split into pipeline stages
(stages.py) that run in this process or as Ray actors (cluster.py)."""

from __future__ import annotations

import os

from . import model
from . import stages as pipeline
from .backend import working_dtype
from .checkpoint import Checkpoint
from .cluster import RayStages
from .errors import InputError


def load(path: str | os.PathLike, dtype="float64", device="cpu", mla_form="auto",
         max_memory: int | None = None, fp8_activations: bool = False, stages: int | None = None,
         ray: str | None = None, stage_memory: int | None = None, report=None):
    """model.load(path, ...) -> a Model; with `stages`, the decoder layers split into that many
    pipeline stages, each keeping its layers resident -> a stages.Pipeline with Model's
    interface.  ray: None (the stages run in this process, one after another), "local" (a Ray
    cluster on this machine) or a Ray address to join.  The plan is passed to report(text)
    (default: not shown) before any weight is read, and refused when a stage needs more than
    stage_memory bytes."""
    if stages is None:
        if ray is not None or stage_memory is not None:
            raise InputError("ray and stage_memory need stages (--stages N)")
        return model.load(path, dtype=dtype, device=device, mla_form=mla_form,
                          max_memory=max_memory, fp8_activations=fp8_activations)
    if max_memory is not None or fp8_activations:
        raise InputError("--max-memory and --fp8-activations do not apply to pipeline stages: "
                         "each stage keeps its layers resident in the working dtype")
    ckpt = Checkpoint(path)
    ckpt.check_against_config()
    ckpt.check_scales()
    dt = working_dtype(dtype)
    plan = pipeline.plan_stages(ckpt.config, stages, dt, present=set(ckpt.names()))
    if report is not None:
        report(pipeline.format_plan(plan, dt))
    pipeline.check_fits(plan, stage_memory)
    executor = pipeline.LocalStages() if ray is None else RayStages(ray)
    return pipeline.Pipeline.start(pipeline.source_of(os.fspath(path)), plan, executor, dtype=dt,
                                   device=device, mla_form=mla_form)
