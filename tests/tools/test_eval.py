"""retrieval-attn eval: dense, retrieval and retrieval with a host index in one table."""

from __future__ import annotations

import json

import pytest

from retrieval_attn.config import KVConfig
from retrieval_attn.errors import ConfigError
from retrieval_attn.tools.eval_longctx import (
    TASKS,
    accuracy_table,
    agreement_table,
    main,
    policy_grid,
)

pytest.importorskip("faiss")


def test_ablation_rows_set_their_keys_at_their_budget():
    grid = policy_grid(KVConfig(), [0.05], ["retrieval"],
                       ablations=["rank=32,sketch_dtype=int4", "tail_estimate=false"],
                       ablate_budget=0.02)
    names = [name for name, _, _ in grid]
    assert names == ["dense", "retrieval@0.05", "retrieval[rank=32,sketch_dtype=int4]@0.02",
                     "retrieval[tail_estimate=false]@0.02"]
    cfg = grid[2][1]
    assert (cfg.policy, cfg.top_k, cfg.rank, cfg.sketch_dtype) == ("retrieval", 0.02, 32, "int4")
    assert grid[3][1].tail_estimate is False
    for bad in ("rank", "no_such_key=1", "rank=33,sketch_dtype=int4"):
        with pytest.raises(ConfigError, match="--ablate"):
            policy_grid(KVConfig(), [0.05], ablations=[bad])


def test_policy_grid_names_every_row():
    grid = policy_grid(KVConfig(), [0.05, 0.02], ["retrieval", "quest"], ["attention"])
    names = [name for name, _, _ in grid]
    assert names == ["dense", "retrieval@0.05", "retrieval+attention@0.05", "quest@0.05",
                     "retrieval@0.02", "retrieval+attention@0.02", "quest@0.02"]
    index = dict((n, i) for n, _, i in grid)
    assert index["retrieval+attention@0.02"].kind == "attention"
    assert index["retrieval@0.02"] is None


@pytest.mark.slow
def test_eval_runs_an_index_policy_beside_dense(tmp_path, capsys):
    assert main(["--config", "cpu-small", "--lengths", "700", "--depths", "0.5",
                 "--per-task", "1", "--budgets", "0.1", "--policies", "retrieval",
                 "--indexes", "attention", "--max-tokens", "6", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("accuracy (%)"):]
    for name in ("dense", "retrieval@0.1", "retrieval+attention@0.1"):
        assert f"\n{name} " in table
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == len(TASKS) * 3  # a prompt of each task, three policies
    assert all(isinstance(r["cut"], bool) for r in rows)
    if any(r["cut"] for r in rows):  # 6 tokens cut most answers: the table says so
        assert "answers hit max_tokens" in table
    diagnostics = json.loads((tmp_path / "results.json").read_text())["diagnostics"]
    assert "retrieval+attention@0.1" in diagnostics


def test_niah_per_depth_adds_needles_and_keeps_the_old_samples():
    from retrieval_attn.tools.longctx_tasks import make_samples

    one = make_samples([1000], [0.2, 0.8], 1, seed=3)
    three = make_samples([1000], [0.2, 0.8], 1, seed=3, niah_per_depth=3)
    assert [s.depth for s in three if s.task == "niah"] == [0.2] * 3 + [0.8] * 3
    assert len({s.expected[0] for s in three if s.task == "niah"}) == 6  # distinct needles
    assert one[0].expected == three[0].expected  # default draws the same first needle


def test_report_merges_shards_into_one_table(tmp_path, capsys):
    rows = [{"policy": p, "task": "niah", "length": 4096, "prompt_tokens": 4090,
             "depth": 0.5, "score": s, "answer": ""} for p, s in
            [("dense", 1.0), ("retrieval@0.05", 0.0)]]
    for i, shard in enumerate([rows, [dict(r, score=1.0) for r in rows]]):
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "results.json").write_text(json.dumps({"rows": shard}))
    assert main(["--report", str(tmp_path / "s0"), str(tmp_path / "s1"),
                 "--out", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "2 prompts from 2 run(s)" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("retrieval@0.05") and "all" in ln)
    assert line.split()[2] == "50.0"  # niah column: one of two prompts
    assert (tmp_path / "merged" / "niah_retrieval_0.05.png").is_file()


def test_report_names_a_folder_without_results(tmp_path):
    with pytest.raises(ConfigError, match="results.json not found"):
        main(["--report", str(tmp_path), "--out", str(tmp_path / "o")])


def test_cut_answers_are_counted_and_warned_of():
    """--max-tokens 16 scored 0.0 on every task without a word (issue 27)"""
    rows = [{"policy": "dense", "task": t, "length": 4096, "depth": 0.5, "score": 0.0,
             "cut": t != "niah"} for t in TASKS]
    n = len(TASKS)
    lines = accuracy_table(rows)
    assert lines[0].split()[-1] == "cut"
    assert lines[1].split()[:2] == ["(prompts)", "4096"]  # then a prompt of each task
    assert lines[2].split()[-1] == f"{n - 1}/{n}"
    assert lines[-1].startswith(f"warning: {n - 1} of {n} answers hit max_tokens")
    assert not accuracy_table([dict(r, cut=False) for r in rows])[-1].startswith("warning")
    # results.json of runs before the column: no cut answers known
    assert accuracy_table([{k: v for k, v in r.items() if k != "cut"} for r in rows])[2] \
        .split()[-1] == f"0/{n}"


def test_bad_max_tokens_is_refused_before_the_model_loads(capsys, tmp_path):
    from retrieval_attn.tools.cli import main as cli

    assert cli(["eval", "--model", "/no/such", "--max-tokens", "0",
                "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: max_tokens is 0")


def test_policy_grid_ablates_the_tail_estimate():
    grid = policy_grid(KVConfig(), [0.05], ["retrieval"], ablate_tail=True)
    assert [(n, c.tail_estimate) for n, c, _ in grid[1:]] == [
        ("retrieval@0.05", True), ("retrieval-notail@0.05", False)]


def test_no_diagnostics_skips_the_traced_prompt(tmp_path):
    assert main(["--config", "cpu-small", "--lengths", "700", "--depths", "0.5",
                 "--per-task", "0", "--budgets", "0.1", "--policies", "retrieval",
                 "--no-diagnostics", "--max-tokens", "4", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["policy"] for r in saved["rows"]] == ["dense", "retrieval@0.1"]
    assert [r["sample"] for r in saved["rows"]] == [0, 0]
    assert saved["diagnostics"] == {}


def test_agreement_pairs_each_row_with_dense_on_its_prompt():
    """A loss on one prompt and a gain on another cancel in the average, not here."""
    def row(policy, sample, score, answer):
        return {"policy": policy, "sample": sample, "task": "niah", "length": 4096,
                "score": score, "answer": answer}
    rows = [row("dense", 0, 1.0, "a"), row("retrieval@0.02", 0, 0.0, "b"),
            row("dense", 1, 0.0, "c"), row("retrieval@0.02", 1, 1.0, "d"),
            row("dense", 2, 0.5, "e"), row("retrieval@0.02", 2, 0.5, "e")]
    header, line = agreement_table(rows)
    assert header.split()[-4:] == ["answer", "lost", "gained", "net"]
    assert line.split() == ["retrieval@0.02", "1/3", "1", "1", "0.0"]


def test_report_pairs_rows_saved_without_sample_ids(tmp_path, capsys):
    """results.json written before rows carried their sample: one block of rows a prompt"""
    rows = [{"policy": p, "task": "niah", "length": 700, "depth": 0.5, "score": s,
             "answer": a} for p, s, a in [("dense", 1.0, "x"), ("retrieval@0.1", 1.0, "x"),
                                          ("dense", 1.0, "y"), ("retrieval@0.1", 0.0, "z")]]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"rows": rows}))
    assert main(["--report", str(tmp_path / "a"), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].split() == ["retrieval@0.1", "1/2", "1", "0", "-50.0"]
