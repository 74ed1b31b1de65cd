"""The whole ``build-shards``: a plan, then N tasks on one of datatrove's executors, then one manifest.

:func:`plan_build` checks the inputs and the tokenizer and shares the files out between the tasks;
:func:`run_build` prepares the output folder (or finds an interrupted build of the same plan to resume) and hands
the tasks to :mod:`data_tools.executors` (datatrove: local processes, Slurm job arrays, Ray). Without datatrove
installed (a bare GPU node with only the training stack), a local build running one task at a time runs them one
after the other in this process: the same shards, no scheduling.

datatrove's own readers are not used: they log and skip a bad JSON line (no fail policy, no count in the
manifest); :mod:`data_tools.inputs` reads the files with fsspec, pyarrow and zstandard under the project's policy.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data_tools.errors import UserError
from data_tools.inputs import expand_inputs
from data_tools.manifest import MANIFEST_NAME, Manifest
from data_tools.records import Fields, OnError
from data_tools.shards import (
    BuildConfig,
    BuildResult,
    Output,
    assign_files,
    build_task,
    merge_manifest,
    prepare_output,
    read_parts,
)
from data_tools.tokenizer import file_sha256, load_tokenizer, special_ids

ExecutorKind = Literal["local", "slurm", "ray"]
RAY_FIX = "install it (pip install 'ray[default]') and start or join a cluster (RAY_ADDRESS), or use --executor local|slurm"
DATATROVE_FIX = "install it (pip install datatrove, a dependency of emo-lightning), or run one task at a time"


@dataclass
class ExecutorOptions:
    """How the tasks run. ``workers``: tasks running at once (local processes; Slurm / Ray: -1, no limit)."""

    kind: ExecutorKind = "local"
    workers: int = 1
    partition: str | None = None  # Slurm
    time: str = "24:00:00"  # Slurm: time limit of one task
    cpus_per_task: int = 1  # Slurm, Ray
    mem_per_cpu_gb: float = 2.0  # Slurm, Ray
    job_name: str = "emo-data"  # Slurm
    env_command: str | None = None  # Slurm: activates the environment (default: this virtualenv)

    def __post_init__(self) -> None:
        if self.kind not in ("local", "slurm", "ray"):
            raise UserError(f"--executor {self.kind!r}: unknown executor", "use local, slurm or ray")
        if self.workers < 1 and not (self.workers == -1 and self.kind != "local"):
            raise UserError(f"--workers {self.workers}: must be >= 1", "the number of tasks running at once")
        if self.cpus_per_task < 1:
            raise UserError(f"--cpus-per-task {self.cpus_per_task}: must be >= 1", "")
        if self.kind == "slurm" and not self.partition:
            raise UserError(
                "--executor slurm: no --partition", "pass the Slurm partition to run the tasks on"
            )
        if self.kind == "slurm" and shutil.which("sbatch") is None:
            raise UserError("--executor slurm: no sbatch command here", "run it on a Slurm login node")
        if self.kind == "ray" and importlib.util.find_spec("ray") is None:
            raise UserError("--executor ray: the ray package is not installed", RAY_FIX)


def plan_build(
    inputs: Sequence[str | Path],
    tokenizer_path: str | Path,
    out: str | Path,
    *,
    tasks: int = 1,
    fields: Fields | None = None,
    shard_size: int | None = None,
    on_error: OnError = "fail",
    seed: int = 0,
    eos_token: str | None = None,
    pad_token: str | None = None,
    options: ExecutorOptions | None = None,
    tmp_dir: str | None = None,
    quiet: bool = False,
) -> BuildConfig:
    """Check the inputs and the tokenizer, and share the files out between ``tasks`` tasks."""
    options = options or ExecutorOptions()
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if tasks < 1:
        raise UserError(f"--tasks {tasks}: must be >= 1", "the number of independent tasks of the build")
    fields = fields or Fields()
    files = expand_inputs([str(p) for p in inputs])
    for f in files:
        fields.path_domain(f.path)  # --domain-from-path matches every input, checked before any work
    tokenizer = load_tokenizer(tokenizer_path)
    eos_tok, eos_id, pad_tok, pad_id = special_ids(tokenizer, eos_token, pad_token, str(tokenizer_path))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    one_at_a_time = options.kind == "local" and min(options.workers, tasks) == 1
    return BuildConfig(
        out=str(out),
        files=files,
        assignment=assign_files(files, tasks),
        tokenizer={
            "path": str(tokenizer_path),
            "sha256": file_sha256(tokenizer_path),
            "eos_token": eos_tok,
            "pad_token": pad_tok,
        },
        eos_id=eos_id,
        pad_id=pad_id,
        vocab_size=vocab_size,
        fields=fields,
        on_error=on_error,
        seed=seed,
        shard_size=shard_size,
        workers=options.workers,
        executor=options.kind,
        tmp_dir=tmp_dir,
        single_threaded=not one_at_a_time and options.cpus_per_task == 1,
        progress=one_at_a_time and not quiet,
    )


@dataclass
class Submitted:
    """A build handed to Slurm: the job ids and where its manifest will appear."""

    config: BuildConfig
    tasks_job: str
    manifest_job: str
    resumed: bool


def run_build(
    config: BuildConfig, options: ExecutorOptions, *, overwrite: bool = False
) -> BuildResult | Submitted:
    """Run (local, Ray) or submit (Slurm) the planned build."""
    in_process = importlib.util.find_spec("datatrove") is None
    if in_process and not (options.kind == "local" and min(options.workers, config.tasks) == 1):
        raise UserError(
            f"--executor {options.kind} --workers {options.workers}: datatrove is not installed",
            DATATROVE_FIX,
        )
    resumed = prepare_output(config, config.tokenizer["path"], overwrite)
    t0 = time.perf_counter()
    if in_process:
        for task in range(config.tasks):
            build_task(config, task)
        merge_manifest(config)
    else:
        from data_tools import executors

        jobs = executors.run(config, options)
        if jobs is not None:
            return Submitted(config, jobs[0], jobs[1], resumed)
    out = Output(config.out)
    if not out.exists(MANIFEST_NAME):  # e.g. Ray gave up on a task after its retries
        read_parts(config)  # names the unfinished task
    manifest = Manifest.from_json(out.read_text(MANIFEST_NAME), f"{config.out}/{MANIFEST_NAME}")
    parts = read_parts(config)
    return BuildResult(
        manifest=manifest,
        text_bytes=manifest.totals["text_bytes"],
        tokens=manifest.totals["tokens"],
        seconds_tokenize=sum(p.seconds_tokenize for p in parts),
        seconds_write=sum(p.seconds_write for p in parts),
        seconds_wall=time.perf_counter() - t0,
        task_results=parts,
    )


def build_shards(
    inputs: Sequence[str | Path],
    tokenizer_path: str | Path,
    out: str | Path,
    *,
    shard_size: int | None = None,
    tasks: int = 1,
    workers: int = 1,
    fields: Fields | None = None,
    on_error: OnError = "fail",
    seed: int = 0,
    eos_token: str | None = None,
    pad_token: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    tmp_dir: str | None = None,
) -> BuildResult:
    """Build shards on this machine: ``tasks`` tasks, ``workers`` of them at once (datatrove's local executor)."""
    options = ExecutorOptions("local", workers=workers)
    config = plan_build(
        inputs,
        tokenizer_path,
        out,
        tasks=tasks,
        fields=fields,
        shard_size=shard_size,
        on_error=on_error,
        seed=seed,
        eos_token=eos_token,
        pad_token=pad_token,
        options=options,
        tmp_dir=tmp_dir,
        quiet=quiet,
    )
    result = run_build(config, options, overwrite=overwrite)
    assert isinstance(result, BuildResult)
    return result


def describe(result: BuildResult | Submitted, out: str) -> str:
    """The one-paragraph summary ``emo-data build-shards`` prints."""
    if isinstance(result, Submitted):
        c = result.config
        return (
            f"{'resumed' if result.resumed else 'submitted'} {c.tasks} tasks as Slurm job {result.tasks_job} and "
            f"the manifest step as job {result.manifest_job} (after them); logs under {out}/.build/; "
            f"{out}/manifest.json appears when every task has finished (run the same command again to resume)"
        )
    m = result.manifest
    domains = ", ".join(f"{k} {v['tokens']}" for k, v in m.per_domain.items())
    tasks = f" by {m.build['tasks']} tasks" if m.build.get("tasks", 1) > 1 else ""
    return (
        f"wrote {len(m.shards)} shards, {m.totals['docs']} documents, {m.totals['tokens']} tokens "
        f"({domains}) to {out}{tasks} in {result.seconds_wall:.1f} s; skipped {m.skipped['total']} records"
    )
