"""The course's lesson dependency map: which lesson needs which, drawn with matplotlib -> lesson_map.png.

Each lesson (and each capstone) is a box; an arrow A -> B says that B builds on A. A solid arrow is a
prerequisite (B uses what A teaches and does not teach it again); a dashed one helps (B says where A's
material comes in, but can be read without it). The edges follow each notebook's "Before you start" cell,
and the README's prerequisites table says the same in words: change the three in step.

    python notebooks/lesson_map.py [--out notebooks/lesson_map.png]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a file, never a window: this runs in CI and over ssh
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

HERE = Path(__file__).resolve().parent

# id: (title, the package files it opens or the pieces it runs, part of the course)
LESSONS = {
    "00": ("00 · the nano model", "nano/, train.py", "start"),
    "01": ("01 · text encoder", "tokenizer, Qwen2.5-VL", "model"),
    "02": ("02 · MMDiT and RoPE", "mmdit.py", "model"),
    "03": ("03 · the scheduler", "scheduler.py", "model"),
    "04": ("04 · the VAE", "vae.py", "model"),
    "05": ("05 · text to image", "sampling.py, pipeline", "model"),
    "06": ("06 · editing", "vision.py, pipeline/edit.py", "model"),
    "07": ("07 · LoRA", "lora.py", "adapt"),
    "08": ("08 · training", "train.py", "adapt"),
    "09": ("09 · several GPUs", "parallel.py, sharded.py", "beyond"),
    "10": ("10 · image conditioning", "img2img, inpaint, ControlNet", "beyond"),
    "C1": ("capstone 1 · pieces", "your RoPE, CFG, Euler", "capstone"),
    "C2": ("capstone 2 · LoRA", "your lora_forward", "capstone"),
}

# lesson: the lessons it needs (solid arrows)
NEEDS = {
    "02": ["00"],
    "05": ["00", "03", "04"],
    "06": ["01", "02", "04", "05"],
    "07": ["02"],
    "08": ["03"],
    "09": ["02", "05", "08"],
    "10": ["00", "03", "05"],
    "C1": ["02", "05"],
    "C2": ["07", "08"],
}

# lesson: the lessons that help (dashed arrows)
HELPS = {
    "01": ["00"],
    "02": ["01"],
    "03": ["00", "02"],
    "04": ["00"],
    "05": ["01", "02"],
    "07": ["00"],
    "08": ["00", "05", "07"],
    "10": ["02"],
}

COLOURS = {
    "start": "#f2d7a6",
    "model": "#bfd7ea",
    "adapt": "#c9e4c5",
    "beyond": "#e3cfe8",
    "capstone": "#f4c2c2",
}
PART_NAMES = {
    "start": "the whole model at work",
    "model": "the model, following the data",
    "adapt": "adapting and training it",
    "beyond": "beyond one GPU, beyond a prompt",
    "capstone": "capstones (make capstone)",
}

# Where each box sits: (column, height). A lesson's column is one more than the latest column among the
# lessons it builds on; the heights were searched once so that no arrow passes through a box, which
# `boxes_crossed` checks on every drawing.
POSITION = {
    "00": (0, -0.275),
    "01": (1, 2.475),
    "04": (1, -3.85),
    "02": (2, -1.1),
    "03": (3, 2.475),
    "05": (4, -0.55),
    "07": (4, -4.4),
    "06": (5, -3.85),
    "10": (5, 2.475),
    "08": (5, 0.275),
    "C1": (6, -2.75),
    "09": (6, -1.375),
    "C2": (6, 0.55),
}


def reachable(edges: dict, start: str, skip: tuple) -> set:
    """The lessons that build on `start`, directly or not, along `edges` ({lesson: [what it builds on]}),
    without using the one edge `skip` = (earlier, later)."""
    after = {}
    for lesson, before in edges.items():
        for b in before:
            if (b, lesson) != skip:
                after.setdefault(b, []).append(lesson)
    seen, todo = set(), [start]
    while todo:
        for nxt in after.get(todo.pop(), []):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def arrows_to_draw(needs: dict, helps: dict) -> tuple[list, list]:
    """The (earlier, later) pairs worth an arrow. A solid edge that other solid edges already imply is left
    out (00 -> 05 -> 10 says that 10 needs 00), so a prerequisite is never hidden behind a path that only
    helps. Every dashed edge is drawn, even when a path through other lessons joins the two (01 -> 02 -> 05
    does not say that 01 helps with 05), so each lesson's list in HELPS shows in full."""
    solid = [(b, n) for n, bs in needs.items() for b in bs if n not in reachable(needs, b, skip=(b, n))]
    dashed = [(b, n) for n, bs in helps.items() for b in bs]
    return solid, dashed


def boxes_crossed(xy: dict, pairs: list, width: float, height: float, margin: float = 0.2) -> list:
    """The (earlier, later, box) triples where the straight arrow earlier -> later passes through another
    lesson's box (grown by `margin` on every side): the segment clipped to the box (Liang-Barsky) is not empty."""
    crossed = []
    for earlier, later in pairs:
        (x0, y0), (x1, y1) = xy[earlier], xy[later]
        for box, (cx, cy) in xy.items():
            if box in (earlier, later):
                continue
            low, high = 0.0, 1.0  # the part of the segment inside the box, as fractions of its length
            for step, room in (
                (x0 - x1, x0 - (cx - width / 2 - margin)),
                (x1 - x0, (cx + width / 2 + margin) - x0),
                (y0 - y1, y0 - (cy - height / 2 - margin)),
                (y1 - y0, (cy + height / 2 + margin) - y0),
            ):
                if step == 0:
                    if room < 0:  # parallel to this side and outside it
                        low, high = 1.0, 0.0
                elif step < 0:
                    low = max(low, room / step)
                else:
                    high = min(high, room / step)
            if low < high:
                crossed.append((earlier, later, box))
    return crossed


def draw(out: Path) -> None:
    if set(POSITION) != set(LESSONS):
        raise ValueError(
            f"POSITION and LESSONS must name the same lessons; differ in {set(POSITION) ^ set(LESSONS)}"
        )
    xy = {lesson: (column * 3.6, height) for lesson, (column, height) in POSITION.items()}
    width, height = 3.0, 0.8  # box size, in the units of xy

    fig, ax = plt.subplots(figsize=(14, 5.8))
    boxes = {}
    for lesson, (title, writes, part) in LESSONS.items():
        x, y = xy[lesson]
        boxes[lesson] = FancyBboxPatch(
            (x - width / 2, y - height / 2), width, height,
            boxstyle="round,pad=0.02,rounding_size=0.15",
            facecolor=COLOURS[part], edgecolor="#444444", linewidth=1.0, zorder=2,
        )  # fmt: skip
        ax.add_patch(boxes[lesson])
        ax.text(x, y + 0.14, title, ha="center", va="center", fontsize=9, weight="bold", zorder=3)
        ax.text(x, y - 0.18, writes, ha="center", va="center", fontsize=8, color="#333333", zorder=3)

    solid, dashed = arrows_to_draw(NEEDS, HELPS)
    crossed = boxes_crossed(xy, solid + dashed, width, height)
    if crossed:
        raise ValueError(
            f"arrows pass through boxes (earlier, later, box): {crossed}; move the boxes in POSITION"
        )
    for pairs, style in (
        (dashed, dict(linestyle=(0, (4, 3)), color="#8a8a8a")),
        (solid, dict(color="#222222")),
    ):
        for earlier, later in pairs:
            # centre to centre, clipped where the line leaves the one box and enters the other
            ax.add_patch(
                FancyArrowPatch(
                    xy[earlier], xy[later], patchA=boxes[earlier], patchB=boxes[later],
                    arrowstyle="-|>", mutation_scale=13, linewidth=1.2, shrinkA=1, shrinkB=1, zorder=1, **style,
                )
            )  # fmt: skip

    legend = [Patch(facecolor=COLOURS[p], edgecolor="#444444", label=PART_NAMES[p]) for p in COLOURS]
    legend += [
        plt.Line2D(
            [], [], color="#222222", label="A → B: B needs A (solid arrows that others imply are left out)"
        ),
        plt.Line2D(
            [], [], color="#8a8a8a", linestyle=(0, (4, 3)), label="A → B: A helps with B (every one drawn)"
        ),
    ]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=9, frameon=False)
    xs = [x for x, _ in xy.values()]
    ys = [y for _, y in xy.values()]
    ax.set_xlim(min(xs) - width / 2 - 0.1, max(xs) + width / 2 + 0.1)
    ax.set_ylim(min(ys) - height / 2 - 0.1, max(ys) + height / 2 + 0.1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("Qwen-Image from the code up: which lesson builds on which", fontsize=13)
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # the bottom strip holds the legend
    fig.savefig(out, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "lesson_map.png")
    a = p.parse_args()
    draw(a.out)
    print(f"lesson map -> {a.out} ({a.out.stat().st_size / 1024:.0f} KB)")
