"""The run console: kfp.local's lines go to per-task logs; one line per task start/end; a failure's tail."""

import io

from conftest import tiny_config

from docev.pipeline.console import TaskConsole

CYAN, RESET = "\x1b[96m", "\x1b[0m"


def _kfp_task(name, status, body):
    return (
        f"09:00:00.000 - INFO - Executing task {CYAN}'{name}'{RESET}\n09:00:00.001 - INFO - Streamed logs:\n\n"
        + "".join(f"    {line}\n" for line in body)
        + f"09:00:01.000 - INFO - Task {CYAN}'{name}'{RESET} finished with status \x1b[92m{status}{RESET}\n"
        + f"09:00:01.001 - INFO - Task '{name}' outputs:\n    Output: '/x'\n"
    )


def test_console_routes_kfp_output(tmp_path, tiny_checkpoint):
    cfg = tiny_config(tmp_path, tiny_checkpoint, [{"source": str(tmp_path)}])
    screen = io.StringIO()
    console = TaskConsole(cfg, screen, summarize=lambda cfg, task: f"numbers of {task}")
    console.write("09:00:00 - INFO - Running pipeline: docev-finetune\n")
    console.write(_kfp_task("validate-shard", "SUCCESS", ["executor input {...}", "WARNING: noisy"]))
    console.write(_kfp_task("validate-shard", "SUCCESS", ["second shard"]))
    text = _kfp_task("train", "FAILURE", [f"line {i}" for i in range(60)])
    for k in range(0, len(text), 7):  # kfp prints in pieces; lines are reassembled
        console.write(text[k : k + 7])
    console.close()
    lines = screen.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines[:4]] == [
        "▶ validate-shard", "✓ validate-shard 0 s  numbers of validate-shard",
        "▶ validate-shard-2", "✓ validate-shard-2 0 s  numbers of validate-shard",
    ]  # fmt: skip
    assert "✗ train failed" in lines[5] and lines[-2].strip() == "line 59" and len(lines) == 6 + 40
    assert "finished with status FAILURE" in lines[-1]  # the tail ends with the status line
    logs = tmp_path / "pipeline" / "logs"
    assert "executor input {...}" in (logs / "validate-shard.log").read_text()
    assert "second shard" in (logs / "validate-shard-2.log").read_text()
    assert "Running pipeline" in (logs / "pipeline.log").read_text() and "noisy" not in screen.getvalue()


def test_concurrent_tasks_keep_their_lines(tmp_path, tiny_checkpoint):
    """kfp.local runs ParallelFor iterations in threads: each thread's lines go to its own task's log."""
    import threading

    cfg = tiny_config(tmp_path, tiny_checkpoint, [{"source": str(tmp_path)}])
    screen = io.StringIO()
    console = TaskConsole(cfg, screen, summarize=lambda cfg, task: "")
    gate = threading.Barrier(2)

    def task(k):
        text = _kfp_task("preprocess-shard", "SUCCESS", [f"shard {k} line {i}" for i in range(50)])
        head, tail = text[:90], text[90:]
        console.write(head)
        gate.wait()  # both started before either streams
        for i in range(0, len(tail), 5):
            console.write(tail[i : i + 5])

    threads = [threading.Thread(target=task, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    console.close()
    logs = [
        (tmp_path / "pipeline" / "logs" / n).read_text() for n in ("preprocess-shard.log", "preprocess-shard-2.log")
    ]
    for text in logs:
        shards = {line.split()[1] for line in text.splitlines() if line.strip().startswith("shard ")}
        assert len(shards) == 1 and text.count(" line ") == 50
    assert sum("✓ preprocess-shard" in line for line in screen.getvalue().splitlines()) == 2


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_on_a_terminal_only(tmp_path, tiny_checkpoint):
    """tqdm lines of any task (training, preprocess, evaluation) become one redrawn line on a terminal; a file
    or pipe gets the start and end lines only."""
    cfg = tiny_config(tmp_path, tiny_checkpoint, [{"source": str(tmp_path)}])
    bars = ["1|3|loss 6.1000:  33%|###       | 1/3 [00:01<00:02,  1.00it/s]\r",
            "1|3|loss 5.2000: 100%|##########| 3/3 [00:03<00:00,  1.00it/s]\r"]  # fmt: skip
    screens = {}
    for kind, screen in (("terminal", _Terminal()), ("pipe", io.StringIO())):
        console = TaskConsole(cfg, screen, summarize=lambda cfg, task: "")
        console.write(_kfp_task("train", "SUCCESS", bars))
        console.write(_kfp_task("evaluate", "SUCCESS", ["evaluate base: 7q [00:03,  2.10q/s]\r"]))
        console.close()
        screens[kind] = screen.getvalue()
    term = screens["terminal"]
    assert "\r\x1b[K  train loss 6.1000 1/3" in term and "\r\x1b[K  train loss 5.2000 3/3" in term
    assert "\r\x1b[K  evaluate evaluate base 7q" in term
    assert term.index("3/3") < term.index("✓ train") < term.index("base 7q") < term.index("✓ evaluate")
    assert term.count("\n") == 4  # the bars add no line
    assert "\r" not in screens["pipe"] and [line.split(" ", 1)[1] for line in screens["pipe"].splitlines()] == [
        "▶ train", "✓ train 0 s", "▶ evaluate", "✓ evaluate 0 s"
    ]  # fmt: skip


def test_handlers_made_during_the_run_go_back_to_stderr(tmp_path, tiny_checkpoint):
    """A logging handler created while stderr was the console keeps it as its stream; after the run the console
    is closed, so ``release_console`` points such handlers at the real stderr (else every later record through
    them prints a "Logging error" traceback)."""
    import contextlib
    import logging
    import sys

    from docev.pipeline.local import release_console

    cfg = tiny_config(tmp_path, tiny_checkpoint, [{"source": str(tmp_path)}])
    console = TaskConsole(cfg, io.StringIO())
    logger = logging.getLogger("docev.test.release_console")
    with contextlib.redirect_stderr(console):
        handler = logging.StreamHandler()  # takes sys.stderr: the console
        logger.addHandler(handler)
    try:
        assert handler.stream is console
        release_console(console)
        console.close()
        assert handler.stream is sys.__stderr__
    finally:
        logger.removeHandler(handler)
