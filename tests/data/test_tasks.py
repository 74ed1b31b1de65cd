"""A build as N tasks (datatrove executors): the same documents as one task, independent of the processes that
run them, resumable after a failure; the Slurm path submits the right job arrays and its pickled tasks build the
same shards; the Ray path refuses clearly without ``ray``."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_tools.build import ExecutorOptions, build_shards, plan_build
from data_tools.cli import main
from data_tools.executors import make_executors
from data_tools.manifest import Manifest
from data_tools.shards import assign_files

from .conftest import REPO
from .helpers import shard_documents


@pytest.fixture(scope="module")
def inputs(corpus, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The four corpus files cut into eight of unequal sizes (so tasks get several files each)."""
    out = tmp_path_factory.mktemp("inputs")
    records, cuts = corpus[1], [0, 30, 50, 60, 90, 100, 130, 145, 160]
    assert len(records) == cuts[-1]
    paths = [out / f"part-{i}.jsonl" for i in range(8)]
    for path, start, stop in zip(paths, cuts, cuts[1:], strict=False):
        path.write_text("".join(json.dumps(r) + "\n" for r in records[start:stop]))
    return paths


@pytest.fixture(scope="module")
def one_task(inputs: list[Path], tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one_task")
    build_shards(inputs, tokenizer_path, out, shard_size=2048, quiet=True)
    return out


def test_n_tasks_equal_one_task(inputs, one_task: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    """3 tasks on 2 processes: the same documents (id, domain, tokens: boundaries and EOS included), tokens and
    per-domain counts as one task; unique shard names; byte-identical whatever the number of processes."""
    a = build_shards(inputs, tokenizer_path, tmp_path / "a", shard_size=2048, tasks=3, workers=2, quiet=True)
    one = Manifest.load(one_task)
    assert Counter(shard_documents(tmp_path / "a")) == Counter(shard_documents(one_task))
    assert a.manifest.per_domain == one.per_domain and a.manifest.domains == one.domains
    assert (
        a.manifest.totals["tokens"] == one.totals["tokens"]
        and a.manifest.totals["docs"] == one.totals["docs"]
    )
    names = [s.name for s in a.manifest.shards]
    assert len(set(names)) == len(names) and {n[:11] for n in names} == {f"shard-0000{t}" for t in range(3)}
    assert sorted(p.name for p in (tmp_path / "a").glob("shard-*.tar")) == sorted(names)
    assert a.manifest.build["tasks"] == 3 and len(a.task_results) == 3
    assert a.manifest.build["input_docs"] == one.build["input_docs"]
    # every task got files, the split balanced by size (largest first onto the lightest task)
    files = [t.input_docs for t in a.task_results]
    assert all(files) and sorted(p for t in files for p in t) == sorted(map(str, inputs))
    b = build_shards(inputs, tokenizer_path, tmp_path / "b", shard_size=2048, tasks=3, workers=1, quiet=True)
    assert [s.name for s in b.manifest.shards] == names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # the interleaving comes from the seed: another seed, same documents in another order
    c = build_shards(inputs, tokenizer_path, tmp_path / "c", shard_size=2048, tasks=3, seed=1, quiet=True)
    assert c.manifest.per_domain == one.per_domain
    order = [d[0] for d in shard_documents(tmp_path / "c")]
    assert order != [d[0] for d in shard_documents(tmp_path / "a")]
    assert sorted(order) == sorted(d[0] for d in shard_documents(tmp_path / "a"))


def test_assignment_balances_bytes() -> None:
    from data_tools.inputs import InputFile

    files = [InputFile(f"f{i}", size) for i, size in enumerate([10, 70, 20, 30, 40, 5])]
    assert assign_files(files, 3) == [[1], [0, 4, 5], [2, 3]]  # 70 | 40+10+5 | 30+20, in input order
    assert assign_files(files, 1) == [[0, 1, 2, 3, 4, 5]]
    assert assign_files(files[:2], 4) == [[1], [0], [], []]


def test_resume_after_a_failed_task(inputs, tokenizer_path: Path, tmp_path: Path) -> None:
    """A task that died (partial shard, no part manifest, no completion) is rerun by the same command; the
    finished tasks are kept as they are; the result equals an uninterrupted build."""
    out = tmp_path / "out"
    full = build_shards(inputs, tokenizer_path, out, shard_size=2048, tasks=3, quiet=True).manifest
    want = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    (out / "manifest.json").unlink()
    (out / ".build" / "parts" / "task-00001.json").unlink()
    (out / ".build" / "tokenize" / "completions" / "00001").unlink()
    victim = next(out.glob("shard-00001-*.tar"))
    victim.write_bytes(victim.read_bytes()[:100])  # killed while writing
    (out / "shard-00001-999999.tar").write_bytes(b"stale")  # a shard the rerun will not write again
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[02]-*.tar")}
    again = build_shards(inputs, tokenizer_path, out, shard_size=2048, tasks=3, quiet=True).manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[02]-*.tar")} == kept  # not rewritten
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == want
    assert again.to_dict() == full.to_dict()
    # another plan (here: the seed) does not resume: its leftovers are replaced
    (out / "manifest.json").unlink()
    other = build_shards(inputs, tokenizer_path, out, shard_size=2048, tasks=3, seed=5, quiet=True).manifest
    assert other.build["seed"] == 5 and other.per_domain == full.per_domain


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``sbatch`` (records each script, answers a job id) and ``scontrol`` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    scripts = {
        "sbatch": f"""#!/bin/sh
n=$(($(ls {tmp_path}/job-*.sh 2>/dev/null | wc -l) + 100))
for a in "$@"; do last="$a"; done
{{ echo "ARGS $*"; }} >> {log}
cp "$last" {tmp_path}/job-$n.sh
echo "Submitted batch job $n"
""",
        "scontrol": "#!/bin/sh\necho localhost\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_slurm_submits_job_arrays_that_build_the_same_shards(
    inputs, one_task: Path, tokenizer_path: Path, fake_slurm: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    argv = [
        "build-shards", "--input", *map(str, inputs), "--tokenizer", str(tokenizer_path), "--out", str(out),
        "--shard-size", "2048", "--tasks", "3", "--executor", "slurm", "--partition", "cpu",
        "--time", "02:00:00", "--job-name", "emo-test", "--env-command", "true", "--quiet",
    ]  # fmt: skip
    main(argv)
    said = capsys.readouterr().out
    assert "submitted 3 tasks as Slurm job 100 and the manifest step as job 102" in said
    jobs = sorted(fake_slurm.glob("job-*.sh"))
    tasks_job, manifest_job = jobs[0].read_text(), jobs[2].read_text()
    for line in (
        "--array=0-2",
        "--partition=cpu",
        "--time=02:00:00",
        "--job-name=emo-test",
        "--cpus-per-task=1",
    ):
        assert f"#SBATCH {line}\n" in tasks_job
    assert f"launch_pickled_pipeline {out}/.build/tokenize/executor.pik" in tasks_job
    assert "#SBATCH --array=0-0\n" in manifest_job and "--job-name=emo-test-manifest" in manifest_job
    assert "--dependency=afterok:100" in (fake_slurm / "sbatch.log").read_text().splitlines()[2]
    assert not (out / "manifest.json").exists()
    # Run the pickled tasks as Slurm would (one process per array index), then the manifest job.
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLURM_NODELIST": "localhost"}
    launch = [sys.executable, "-c", "from datatrove.tools.launch_pickled_pipeline import main; main()"]
    for folder, n in (("tokenize", 3), ("manifest", 1)):
        for index in range(n):
            subprocess.run(
                [*launch, str(out / ".build" / folder / "executor.pik")],
                env={**env, "SLURM_ARRAY_TASK_ID": str(index)},
                check=True,
                capture_output=True,
            )
    m = Manifest.load(out)
    assert m.build["executor"] == "slurm" and m.build["tasks"] == 3
    assert Counter(shard_documents(out)) == Counter(shard_documents(one_task))
    local = build_shards(
        inputs, tokenizer_path, tmp_path / "local", shard_size=2048, tasks=3, quiet=True
    ).manifest
    assert [s.name for s in m.shards] == [s.name for s in local.shards]
    for s in m.shards:  # byte for byte what the local executor writes
        assert (out / s.name).read_bytes() == (tmp_path / "local" / s.name).read_bytes()


def test_ray_executor(inputs, tokenizer_path: Path, tmp_path: Path, capsys) -> None:
    """Without ``ray``: one line naming the fix, nothing written. With it: the executors of the plan."""
    if importlib.util.find_spec("ray") is None:
        with pytest.raises(SystemExit) as exit_info:
            main(["build-shards", "--input", str(inputs[0]), "--tokenizer", str(tokenizer_path),
                  "--out", str(tmp_path / "out"), "--executor", "ray", "--tasks", "4"])  # fmt: skip
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == (
            "emo-data: --executor ray: the ray package is not installed: install it (pip install 'ray[default]') "
            "and start or join a cluster (RAY_ADDRESS), or use --executor local|slurm\n"
        )
        assert not (tmp_path / "out").exists()
        return
    options = ExecutorOptions("ray", workers=-1, cpus_per_task=2)
    config = plan_build(inputs, tokenizer_path, tmp_path / "out", tasks=4, options=options)
    first, second = make_executors(config, options)
    assert (first.world_size, first.cpus_per_task, second.world_size, second.depends) == (4, 2, 1, first)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--tasks", "0"], "emo-data: --tasks 0: must be >= 1: the number of independent tasks of the build"),
        (
            ["--executor", "slurm"],
            "emo-data: --executor slurm: no --partition: pass the Slurm partition to run the tasks on",
        ),
        (["--time", "1:00:00"], "emo-data: --time: a Slurm option: pass --executor slurm, or leave it out"),
        (["--workers", "0"], "emo-data: --workers 0: must be >= 1: the number of tasks running at once"),
    ],
)
def test_executor_mistakes(args, line, inputs, tokenizer_path: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["build-shards", "--input", str(inputs[0]), "--tokenizer", str(tokenizer_path),
              "--out", str(tmp_path / "out"), *args])  # fmt: skip
    assert exit_info.value.code == 2 and capsys.readouterr().err == line + "\n"
