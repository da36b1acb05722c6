"""reports/bench.json -> reports/bench.md, a table for the README."""

from __future__ import annotations

import json

from common import RESULTS


def main() -> None:
    results = json.loads(RESULTS.read_text())
    machine = results.pop("machine")
    lines = [
        "| benchmark | figure | value | unit | baseline |",
        "| --- | --- | --- | --- | --- |",
    ]
    for bench, figures in results.items():
        for name, fig in figures.items():
            if isinstance(fig, dict) and "value" in fig:
                lines.append(
                    f"| {bench} | {name} | {fig['value']} | {fig['unit']} | {fig.get('baseline', '')} |"
                )
            else:  # a note: what was measured on, or why a figure was skipped
                lines.append(f"| {bench} | {name} | {fig} | | |")
    header = ", ".join(f"{k}: {v}" for k, v in machine.items())
    text = f"Machine: {header}\n\n" + "\n".join(lines) + "\n"
    RESULTS.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
