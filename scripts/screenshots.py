"""Render an SVG of every main screen of `chess-mlx chat` on the shipped model into assets/screenshots/.

    python scripts/screenshots.py [MODEL_DIR]

Runs the real app headless (Textual's Pilot), so the pictures show real replies and real stats
(measured on whatever machine runs this; the committed ones come from the 2-core CPU CI box).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.chat import ChatApp  # noqa: E402
from chess_mlx import thresholds as T  # noqa: E402
from chess_mlx.chat_session import ChatSession  # noqa: E402
from chess_mlx.model_io import fingerprint, load_model  # noqa: E402
from chess_mlx.paths import default_model_dir  # noqa: E402
from chess_mlx.sampling import Sampling  # noqa: E402

OUT = ROOT / "assets" / "screenshots"
SIZE = (140, 42)


async def _wait(pilot, cond, seconds=300.0):
    for _ in range(int(seconds / 0.05)):
        if cond():
            return
        await pilot.pause(0.05)
    raise SystemExit("timed out waiting for the app")


async def shoot(folder: Path) -> None:
    model, tok, _ = load_model(folder)
    th = T.load(folder, fingerprint(model))
    session = ChatSession(model, tok, th, "chess", 0.5)
    app = ChatApp(session, Sampling(max_tokens=120), model_name=folder.name, save_dir=OUT)
    OUT.mkdir(parents=True, exist_ok=True)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one("#prompt").value = "Write a Python function that reverses a string, with a short example."
        await pilot.press("enter")
        await _wait(pilot, lambda: app.replies >= 1)
        await pilot.pause(0.5)
        app.save_screenshot("chat.svg", str(OUT))
        await pilot.press("f1")
        await pilot.pause(0.3)
        app.save_screenshot("help.svg", str(OUT))
        await pilot.press("escape")
        await pilot.press("f6")
        await pilot.pause(0.3)
        app.save_screenshot("settings.svg", str(OUT))
        await pilot.press("escape")
        await pilot.press("f5")
        await pilot.pause(0.3)
        app.screen.query_one("TextArea").text = "You are a concise assistant. Answer in one or two sentences."
        app.save_screenshot("system_prompt.svg", str(OUT))
        await pilot.press("escape")
        await pilot.press("ctrl+p")
        await pilot.pause(0.3)
        await pilot.press(*"spars")
        await pilot.pause(0.5)
        app.save_screenshot("command_palette.svg", str(OUT))
        await pilot.press("escape")
        await pilot.pause(0.3)
        app.sampling = Sampling(max_tokens=60)
        await pilot.press("f4")
        await pilot.pause(0.3)
        app.screen.query_one("#cmp-prompt").value = "Give me three tips for a good night's sleep."
        await pilot.press("enter")
        await _wait(pilot, lambda: app.replies >= 2)
        await pilot.pause(0.5)
        app.save_screenshot("compare.svg", str(OUT))
    for p in sorted(OUT.glob("*.svg")):
        print(p.relative_to(ROOT))


if __name__ == "__main__":
    from chess_mlx.blas import reexec_with_openblas

    reexec_with_openblas([__file__, *sys.argv[1:]])
    asyncio.run(shoot(Path(sys.argv[1]) if len(sys.argv) > 1 else default_model_dir()))
