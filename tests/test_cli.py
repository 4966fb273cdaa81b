"""engine/cli.py: every ``python -m`` entry point reports a user-input error as ``error: <message>`` on
stderr with exit status 2 and no traceback; ``main()`` itself still raises (other tests rely on that)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.cli import EXIT_INTERRUPTED, EXIT_REPORTED, EXIT_USER_ERROR, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Each command fails on its first user input, before any model or data work: a few seconds at most
# (stage2 and chat pay for importing torch).
@pytest.mark.parametrize("argv,named", [
    (["train.mix_instruct", "--output", "out.json", "--conversation", "missing.json"], "missing.json"),
    (["llava_evals.scienceqa", "score", "--questions", "missing_q.json", "--predictions", "p.jsonl"], "missing_q.json"),
    (["train.stage2", "--model", "no_such_ckpt", "--data", "d.json", "--device", "cpu"], "no_such_ckpt"),
    (["engine.chat", "hi", "--model", "m", "--image", "missing.png"], "missing.png"),
    (["engine.chat", "hi", "--model", "m", "--adapter", "missing_adapter"], "missing_adapter"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_entry_point_reports_user_error_without_traceback(tmp_path, argv, named):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    assert last.startswith("error: ") and named in last, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out.json").exists()


def _exit_status(fn, *args, **kw) -> int:
    with pytest.raises(SystemExit) as e:
        run_main(fn, *args, **kw)
    return e.value.code


def _raise(exc):
    def main(*_):
        raise exc
    return main


class JudgeDown(RuntimeError):
    pass


def test_run_main_exit_statuses(capsys):
    assert _exit_status(lambda stage: stage + 1, 2) == 3          # an int return is the status
    assert _exit_status(lambda: {"samples": 3}) == 0              # a summary dict (mix_instruct) is success
    assert _exit_status(lambda: None) == 0
    capsys.readouterr()
    assert _exit_status(_raise(FileNotFoundError("no such file: a.json"))) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: no such file: a.json\n"
    assert _exit_status(_raise(JudgeDown("2 of 9 judge calls failed")), reported=(JudgeDown,)) == EXIT_REPORTED
    assert capsys.readouterr().err == "error: 2 of 9 judge calls failed\n"
    assert _exit_status(_raise(KeyboardInterrupt())) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == ""


def test_run_main_lets_bugs_keep_their_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        run_main(_raise(RuntimeError("a bug")))
    with pytest.raises(JudgeDown):  # a RuntimeError subclass is only reported where the entry point asks
        run_main(_raise(JudgeDown("x")))
