"""`chess-mlx chat` in a real terminal (tmux): send a prompt, capture the screen, quit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest


def _tmux(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=check, timeout=30)


def _wait_screen(name: str, cond, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux("capture-pane", "-p", "-t", name).stdout
        if cond(screen):
            return screen
        time.sleep(0.25)
    raise AssertionError("timed out; the screen was:\n" + screen)


def test_chat_in_a_real_terminal(shipped_model_dir, tmp_path):
    if shutil.which("tmux") is None:
        msg = "tmux is not installed (scripts/test.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    name = f"chess-mlx-test-{os.getpid()}"
    done = tmp_path / "exit_code"
    cmd = (f"{sys.executable} -m chess_mlx chat {shipped_model_dir} --method chess --sparsity 0.5 "
           f"--max-tokens 24 --save-dir {tmp_path}; echo $? > {done}")
    env = dict(os.environ, TERM="xterm-256color")
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "140", "-y", "45", cmd], check=True, env=env,
                   timeout=30)
    try:
        _wait_screen(name, lambda s: "Message (Enter to send" in s, 120)
        _tmux("send-keys", "-t", name, "-l", "What is the capital of France?")
        _tmux("send-keys", "-t", name, "Enter")
        # the reply is over when the stats show whole-reply sparsity
        screen = _wait_screen(name, lambda s: "FFN sparsity" in s and "(reply)" in s, 120)
        (tmp_path / "screen.txt").write_text(screen)
        tps = float(re.search(r"tokens/s\s+([\d.]+)", screen).group(1))
        assert tps > 0, screen
        lines = screen.splitlines()
        asked = next(i for i, line in enumerate(lines) if "> What is the capital of France?" in line)
        reply = " ".join(line.split("│")[0] for line in lines[asked + 1: asked + 6]).strip()
        assert len(reply) > 3, screen  # the reply is on screen under the prompt
        assert "chess @ 0.5" in screen
        # the app ran the method once when it started (ChatApp._prepare): no setup in this reply
        assert "TTFT" in screen and "setup (once)" not in screen, screen
        _tmux("send-keys", "-t", name, "C-q")
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done.exists() and done.read_text().strip() == "0"
    finally:
        _tmux("kill-session", "-t", name, check=False)
