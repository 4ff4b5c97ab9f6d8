"""The server under sustained load, on loopback: a short request beside a long one, short requests
among long streams, faults interleaved with good requests, a small queue flooded, and a soak.

    python -m benchmark.serve_goals --dataset_path ../shared/dolly/dolly-sample.jsonl --out results/serving/goals

Each scenario starts ``serving.py`` as a subprocess (``benchmark.load_test.Server``: the embedded pair,
or the model flags) and drives it with httpx clients; every loop is bounded in requests and time.

* short beside long: a short request (the prompt "The quick brown fox", 4 tokens, greedy) alone,
  ``--trials`` times, streamed and not; then the same with a long one (400 tokens) sent 1 s before
  it. Goal: the short one's latency beside the long one at most 1.5x its latency alone plus one
  decode step (the long one's latency over its target passes, alone).
* sustained: 4 long streams kept running for ``--duration_s`` (each restarted when it ends), a short
  request every ``--every_s`` in between. Goal: the short requests' p99 under 1 s.
* faults: ``--faults`` requests, every other one bad (``benchmark.load_test.bad_bodies``: NaN,
  seeds out of range, unsupported fields, a 50 MB body, a 5 MB prompt, text/plain, ...), 8 at a time;
  the good ones greedy, a third of them at a temperature so small it counts as greedy. Goal: every
  good one the text it gets alone, every bad one a 4xx.
* flood: a server with ``--queue_size 4`` sent 40 requests with distinct seeds at once, five times.
  Goal: 429s (with Retry-After) for what does not fit, the others answered, resident memory flat
  (from after the first flood to after the last, under 5%).
* soak: 8 clients for ``--soak_s``, requests of mixed lengths, greedy and seeded sampling, streamed
  and not. Goal: no error, resident memory growth under 5% (the median over the last two minutes
  against the median over minutes 1 to 3: memory moves with the requests in flight).

Writes one CSV per scenario, summary.json and table.md to ``--out``.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time

import pandas as pd

from sampling.app.cli import Parser, add_model_args, run
from sampling.app.dolly import load_dolly, render_prompt

from .console import para
from .load_test import Server, reliability
from .utils_io import env_info, write_csv, write_json, write_text

MODEL = "bass-embedded"
SHORT = dict(model=MODEL, prompt="The quick brown fox", max_tokens=4, temperature=0)
LONG = dict(SHORT, max_tokens=400)


async def call(http, body: dict) -> dict:
    """One request, streamed or not: status, latency, first-token time, tokens, target passes."""
    t0 = time.perf_counter()
    first, tokens, tpc, status = None, 0, None, None
    if body.get("stream"):
        with_usage = dict(body, stream_options={"include_usage": True})
        async with http.stream("POST", "/v1/completions", json=with_usage) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    tpc = (chunk.get("speculative") or {}).get("tokens_per_target_call") or tpc
    else:
        r = await http.post("/v1/completions", json=body)
        status = r.status_code
        if status == 200:
            j = r.json()
            tokens = j["usage"]["completion_tokens"]
            tpc = j["speculative"][0].get("tokens_per_target_call")
    calls = tokens / tpc if tpc and tokens else None
    return dict(status=status, latency_s=time.perf_counter() - t0, first_s=first, tokens=tokens, target_calls=calls)


async def short_beside_long(url: str, trials: int) -> pd.DataFrame:
    import httpx
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await call(http, SHORT)                                          # warm
        alone_long = await call(http, LONG)
        step = alone_long["latency_s"] / max(1.0, alone_long["target_calls"] or alone_long["tokens"])
        for t in range(trials):
            for stream in (False, True):
                rows.append(dict(case="alone", stream=stream, trial=t, step_s=step,
                                 **await call(http, dict(SHORT, stream=stream))))
                long = asyncio.ensure_future(call(http, LONG))
                await asyncio.sleep(1.0)
                rows.append(dict(case="beside long", stream=stream, trial=t, step_s=step,
                                 **await call(http, dict(SHORT, stream=stream))))
                rows.append(dict(case="the long one", stream=stream, trial=t, step_s=step, **await long))
    return pd.DataFrame(rows)


async def sustained(url: str, duration: float, every: float) -> pd.DataFrame:
    import httpx
    rows, stop = [], time.monotonic() + duration
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await call(http, SHORT)

        async def long_stream(k: int):
            while time.monotonic() < stop:
                rows.append(dict(case="long stream", client=k, **await call(http, dict(LONG, stream=True))))

        async def shorts():
            pending = []
            while time.monotonic() < stop:
                async def one():
                    rows.append(dict(case="short", client=-1, **await call(http, SHORT)))
                pending.append(asyncio.ensure_future(one()))
                await asyncio.sleep(every)
            await asyncio.gather(*pending)
        await asyncio.gather(*(long_stream(k) for k in range(4)), shorts())
    return pd.DataFrame(rows)


async def flood(server: Server, n: int = 40, rounds: int = 5) -> pd.DataFrame:
    """``rounds`` floods of ``n`` requests with distinct seeds at once; the server's resident memory
    after a warm batch and after each flood (the first flood's full batch allocates once)."""
    import httpx
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
        def body(i):
            return dict(SHORT, max_tokens=32, temperature=1.0, seed=1000 + i)

        await asyncio.gather(*(http.post("/v1/completions", json=body(i)) for i in range(4)))
        before = server.rss_mib()

        async def one(r, i):
            t0 = time.perf_counter()
            got = await http.post("/v1/completions", json=body(r * n + i))
            return dict(round=r, request=i, status=got.status_code, latency_s=time.perf_counter() - t0,
                        retry_after=got.headers.get("retry-after"))
        rows = []
        for r in range(rounds):
            got = await asyncio.gather(*(one(r, i) for i in range(n)))
            waiting = (await http.get("/health")).json()["waiting"]
            rows += [dict(x, rss_before_mib=before, rss_after_mib=server.rss_mib(), waiting_after=waiting)
                     for x in got]
    return pd.DataFrame(rows)


async def soak(server: Server, prompts: list[str], seconds: float, clients: int = 8) -> pd.DataFrame:
    import httpx
    rows, stop, t_start = [], time.monotonic() + seconds, time.monotonic()
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
        async def client(k):
            i = 0
            while time.monotonic() < stop:
                i += 1
                body = dict(model=MODEL, prompt=rng.choice(prompts), max_tokens=rng.choice((4, 16, 64, 128)),
                            temperature=rng.choice((0.0, 1.0)), stream=rng.random() < 0.5)
                if body["temperature"]:
                    body["seed"] = rng.randrange(10 ** 9)
                rows.append(dict(kind="request", client=k, t_s=time.monotonic() - t_start, **await call(http, body)))

        async def memory():
            while time.monotonic() < stop:
                rows.append(dict(kind="memory", t_s=time.monotonic() - t_start, rss_mib=server.rss_mib()))
                await asyncio.sleep(5)
            rows.append(dict(kind="memory", t_s=time.monotonic() - t_start, rss_mib=server.rss_mib()))
        await asyncio.gather(memory(), *(client(k) for k in range(clients)))
    return pd.DataFrame(rows)


def pct(x: pd.Series, q: float) -> float:
    return float(x.quantile(q)) if len(x) else float("nan")


async def drive(args, prompts: list[str]) -> dict:
    out = {}
    server = Server("bass", args)
    try:
        await server.ready()
        if args.trials:
            out["short_beside_long"] = await short_beside_long(server.url, args.trials)
        if args.duration_s:
            out["sustained"] = await sustained(server.url, args.duration_s, args.every_s)
        if args.faults:
            out["faults"] = await reliability(server.url, MODEL, prompts, args.faults, 8)
        if args.soak_s:
            out["soak"] = await soak(server, prompts, args.soak_s)
    finally:
        server.stop()
    small = Server("bass", args, queue_size=4)
    try:
        await small.ready()
        out["flood"] = await flood(small)
    finally:
        small.stop()
    return out


def summarise(res: dict) -> tuple[dict, str]:
    s, lines = {}, ["| goal | measured | met |", "|---|---|---|"]
    if "short_beside_long" in res:
        d = res["short_beside_long"]
        step = float(d.step_s.iloc[0])
        for stream in (False, True):
            alone = statistics.median(d[(d.case == "alone") & (d.stream == stream)].latency_s)
            beside = d[(d.case == "beside long") & (d.stream == stream)].latency_s
            bound = 1.5 * alone + step
            s[f"short_{'stream' if stream else 'plain'}"] = dict(alone_s=alone, beside_median_s=beside.median(),
                                                                 beside_max_s=beside.max(), bound_s=bound, step_s=step)
            how = "streamed" if stream else "not streamed"
            lines.append(f"| a short request beside a long one ({how}): at most 1.5x alone + one step = "
                         f"{bound:.3f} s | alone {alone:.3f} s; beside: median {beside.median():.3f} s, max "
                         f"{beside.max():.3f} s | {'yes' if beside.max() <= bound else 'no'} |")
    if "sustained" in res:
        d = res["sustained"]
        short = d[d.case == "short"]
        ok = short[short.status == 200].latency_s
        p99 = pct(ok, 0.99)
        s["sustained"] = dict(shorts=len(short), failed=int((short.status != 200).sum()), p50_s=pct(ok, 0.5),
                              p99_s=p99, max_s=float(ok.max()), long_streams=int((d.case == "long stream").sum()))
        met = p99 < 1 and not s["sustained"]["failed"]
        lines.append(f"| short requests among 4 long streams: p99 under 1 s | {len(short)} shorts, p50 "
                     f"{pct(ok, 0.5):.3f} s, p99 {p99:.3f} s, max {ok.max():.3f} s, "
                     f"{s['sustained']['failed']} failed | {'yes' if met else 'no'} |")
    if "faults" in res:
        d = res["faults"]
        g = d.groupby("kind").ok
        good, bad = ((int(g.sum().get(k, 0)), int(g.size().get(k, 0))) for k in ("good", "bad"))
        met = good[0] == good[1] and bad[0] == bad[1] and bool(d.alive_after.iloc[0])
        s["faults"] = dict(good_correct=good[0], good=good[1], bad_refused=bad[0], bad=bad[1],
                           statuses=d[d.kind == "bad"].status.value_counts().to_dict())
        lines.append(f"| faults interleaved: every good one its text alone, every bad one a 4xx | good "
                     f"{good[0]}/{good[1]}, bad refused {bad[0]}/{bad[1]} | {'yes' if met else 'no'} |")
    if "flood" in res:
        d = res["flood"]
        refused = d[d.status == 429]
        each = d.groupby("round").rss_after_mib.first().tolist()
        before, after = each[0], each[-1]                # the first flood is the warm-up of a full batch
        growth = after / before - 1
        met = len(refused) > 0 and (pd.to_numeric(refused.retry_after) == 1).all() and d.status.isin([200, 429]).all()
        per = d.groupby("round").status
        s["flood"] = dict(rounds=int(d["round"].nunique()), answered=int((d.status == 200).sum()),
                          refused_429=len(refused), rss_warm_mib=float(d.rss_before_mib.iloc[0]),
                          rss_after_each_mib=each, growth=growth,
                          answered_each=per.apply(lambda x: int((x == 200).sum())).tolist(),
                          waiting_after=int(d.waiting_after.iloc[-1]))
        lines.append(f"| --queue_size 4, 40 seeded requests at once, {s['flood']['rounds']} times: 429s, memory "
                     f"flat | answered {s['flood']['answered_each']}, {len(refused)} refused (429, Retry-After: 1), "
                     f"RSS after the first and the last flood {before:.0f} -> {after:.0f} MiB ({growth:+.1%}) | "
                     f"{'yes' if met and abs(growth) < 0.05 else 'no'} |")
    if "soak" in res:
        d = res["soak"]
        req, mem = d[d.kind == "request"], d[d.kind == "memory"]
        # resident memory moves with the requests in flight (a batch's activations come and go), so
        # growth compares medians: the last two minutes against minutes 1 to 3 (the first minute warms up)
        end_s = float(mem.t_s.iloc[-1])
        early = mem[(mem.t_s >= min(60, end_s / 3)) & (mem.t_s < min(180, 2 * end_s / 3))].rss_mib
        late = mem[mem.t_s >= max(end_s - 120, 2 * end_s / 3)].rss_mib
        base, end = float(early.median()), float(late.median())
        growth = end / base - 1
        errors = int((req.status != 200).sum())
        s["soak"] = dict(requests=len(req), errors=errors, seconds=end_s, rss_early_median_mib=base,
                         rss_late_median_mib=end, growth=growth, rss_first_mib=float(mem.rss_mib.iloc[0]),
                         rss_last_sample_mib=float(mem.rss_mib.iloc[-1]), rss_max_mib=float(mem.rss_mib.max()),
                         tokens_per_s=float(req.tokens.sum() / end_s))
        lines.append(f"| soak, 8 clients for {end_s:.0f} s: no error, RSS growth under 5% | {len(req)} requests, "
                     f"{errors} errors; RSS median {base:.0f} MiB (minutes 1-3) -> {end:.0f} MiB (last 2 minutes), "
                     f"{growth:+.1%}; samples {early.min():.0f}-{early.max():.0f} -> {late.min():.0f}-"
                     f"{late.max():.0f} MiB | {'yes' if not errors and growth < 0.05 else 'no'} |")
    return s, "\n".join(lines)


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    ap.add_argument("--dataset_path", required=True, help="Dolly-format jsonl: the soak's and the faults' prompts")
    ap.add_argument("--trials", type=int, default=5, help="short beside long: trials (0: skip)")
    ap.add_argument("--duration_s", type=float, default=60.0, help="sustained: seconds of long streams (0: skip)")
    ap.add_argument("--every_s", type=float, default=0.5, help="sustained: a short request every this many seconds")
    ap.add_argument("--faults", type=int, default=200, help="requests, every other one bad (0: skip)")
    ap.add_argument("--soak_s", type=float, default=600.0, help="soak: seconds (0: skip)")
    ap.add_argument("--max_batch", type=int, default=8, help="the servers' --max_batch")
    ap.add_argument("--max_wait_ms", type=float, default=10.0, help="the servers' --max_wait_ms")
    ap.add_argument("--out", required=True, help="output folder (must not exist)")
    args = ap.parse_args(argv)
    for name in ("trials", "duration_s", "faults", "soak_s"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.every_s <= 0 or args.max_batch < 1:
        raise ValueError("--every_s must be > 0 and --max_batch >= 1")
    if os.path.exists(args.out):
        raise ValueError(f"{args.out} exists; pick another --out")
    prompts = [render_prompt(r) for r in load_dolly(args.dataset_path)[:48]]
    res = asyncio.run(drive(args, prompts))
    os.makedirs(args.out)
    for name, df in res.items():
        write_csv(os.path.join(args.out, f"{name}.csv"), df)
    summary, table = summarise(res)
    write_json(os.path.join(args.out, "summary.json"), dict(summary, env=env_info(), args=vars(args)))
    write_text(os.path.join(args.out, "table.md"), table + "\n")
    for row in table.splitlines()[2:]:                     # one goal a paragraph: the table's rows are prose
        goal, measured, met = (c.strip() for c in row.strip("|").split(" | "))
        print(para(f"[{'met' if met == 'yes' else 'NOT met'}] {goal}: {measured}"))


if __name__ == "__main__":
    run(main)
