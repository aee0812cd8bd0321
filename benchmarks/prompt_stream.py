"""Peak memory of a streamed prompt source: 1,000,000 prompts against 10,000, side by side.

Each size runs in its own process (peak RSS is per process): it writes a local text file of N prompts, opens it as
a streaming `datasets` prompt source (`dataset:text` with `streaming=True`, a 10,000-row shuffle buffer), draws
`--draws` prompts, checkpoints the source's state, restores it in a fresh source and checks that the next prompts
are the ones the first source draws. Prints peak RSS per size, the difference and the ratio.

    python benchmarks/prompt_stream.py            # 10k and 1M prompts, 20k draws each
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(num_prompts: int, draws: int, folder: str) -> dict:
    path = os.path.join(folder, f"prompts_{num_prompts}.txt")
    with open(path, "w") as f:
        for i in range(num_prompts):
            f.write(f"a photo of subject number {i} in style {i % 97}\n")
    from tdpo_trl.prompts import DatasetPromptSource

    baseline = peak_rss_mb()
    start = time.perf_counter()
    source = DatasetPromptSource("text", "text", data_files=path, streaming=True, seed=0)
    drawn = [source()[0] for _ in range(draws)]
    elapsed = time.perf_counter() - start
    state = source.state_dict()
    resumed = DatasetPromptSource("text", "text", data_files=path, streaming=True, seed=0)
    resumed.load_state_dict(state)
    resume_start = time.perf_counter()
    continues = [resumed()[0] for _ in range(100)] == [source()[0] for _ in range(100)]
    return {
        "num_prompts": num_prompts,
        "draws": draws,
        "distinct_drawn": len(set(drawn)),
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_source_mb": baseline,
        "draw_s": elapsed,
        "resume_s": time.perf_counter() - resume_start,
        "resume_continues": continues,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--draws", type=int, default=20_000)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one size
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(run_one(args.one, args.draws, folder)))
        return
    results = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--one", str(size), "--draws", str(args.draws)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    print(f"{'prompts':>10} {'draws':>7} {'distinct':>9} {'peak RSS MB':>12} {'draw s':>7} {'resume s':>9} continues")
    for r in results:
        print(
            f"{r['num_prompts']:>10,} {r['draws']:>7,} {r['distinct_drawn']:>9,} {r['peak_rss_mb']:>12.1f} "
            f"{r['draw_s']:>7.2f} {r['resume_s']:>9.2f} {r['resume_continues']}"
        )
    small, large = results[0], results[-1]
    print(
        f"\npeak RSS {large['num_prompts']:,} vs {small['num_prompts']:,} prompts: "
        f"{large['peak_rss_mb'] - small['peak_rss_mb']:+.1f} MB ({large['peak_rss_mb'] / small['peak_rss_mb']:.3f}x)"
    )


if __name__ == "__main__":
    main()
