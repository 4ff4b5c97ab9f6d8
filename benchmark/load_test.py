"""Load test of serving.py on 127.0.0.1: throughput, TTFT and latency percentiles per concurrency.

    python -m benchmark.load_test --dataset_path ../shared/dolly/dolly-sample.jsonl --out results/serving

For each serving mode (``--serve_modes``: bass batching, ar batching, google one request at a time;
the batched ones with and without continuous batching, ``--continuous``) a server is started as a
subprocess on a free loopback port with the embedded pair (or the model flags), warmed up, and
driven by ``concurrency`` asyncio clients (httpx) that each send streamed completions of Dolly
prompts back to back until ``--requests`` have been sent; then the
next concurrency. Each request records its time to the first streamed token (TTFT), its latency
and its completion tokens (raw.csv), aggregated per mode and concurrency (summary.csv: tokens/s
over the level's wall time, TTFT and latency p50 / p95 / p99) and plotted. Bounded: at most
``--requests`` per level and ``--timeout_s`` per request; the levels' modes are interleaved so a
drifting machine slows each alike, ``--rounds`` times in rotating order (tokens/s: the median round).
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

from sampling.app.cli import Parser, add_model_args, check_at_least_one, run
from sampling.app.dolly import load_dolly, render_prompt

from .console import fit_markdown
from .utils_io import save_figure, write_csv, write_text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """serving.py in a subprocess on a free loopback port."""

    def __init__(self, mode: str, args, continuous: bool = True, queue_size: int = 256):
        self.port = free_port()
        self.log = tempfile.TemporaryFile("w+")             # the server's log (a pipe nobody reads would fill)
        flags = ["--device", args.device, "--dtype", args.dtype] + \
            [x for f in ("target_model_name", "approx_model_name") if getattr(args, f)
             for x in ("--" + f, getattr(args, f))]
        self.proc = subprocess.Popen([sys.executable, "serving.py", "--port", str(self.port), "--serve_mode", mode,
                                      "--max_batch", str(args.max_batch), "--max_wait_ms", str(args.max_wait_ms),
                                      "--queue_size", str(queue_size), "--continuous", "on" if continuous else "off",
                                      *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    async def ready(self, timeout: float = 120.0) -> None:
        import httpx
        t0 = time.monotonic()
        async with httpx.AsyncClient() as http:
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited: {self.output()[-2000:]}")
                try:
                    if (await http.get(self.url + "/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"the server did not answer within {timeout} s")

    def output(self) -> str:
        """What the server has logged so far."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def rss_mib(self) -> float:
        """The server process's resident memory (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one(http, url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    """One streamed completion: TTFT, latency, completion tokens, speculative statistics."""
    t0 = time.perf_counter()
    ttft, tokens, spec, status = None, 0, {}, 200
    body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
    try:
        async with http.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") and ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("speculative"):
                    spec = chunk["speculative"]
    except Exception as e:                                  # a failed request is a row, not a crash
        status = type(e).__name__
    return dict(status=status, ttft_s=ttft, latency_s=time.perf_counter() - t0, completion_tokens=tokens,
                drafted=spec.get("drafted_tokens"), accepted=spec.get("accepted_tokens"), batch=spec.get("batch"))


async def level(url: str, model: str, prompts: list[str], concurrency: int, n: int, max_tokens: int,
                timeout: float) -> tuple[list[dict], float]:
    """``concurrency`` clients sending ``n`` requests in all; rows and the level's wall time."""
    import httpx
    todo = list(range(n))
    rows = []

    async def client(http):
        while todo:
            i = todo.pop(0)
            row = await one(http, url, model, prompts[i % len(prompts)], max_tokens, timeout)
            rows.append(dict(row, request=i, prompt=i % len(prompts)))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return rows, time.perf_counter() - t0


def bad_bodies(model: str, big: bool = True) -> list[tuple[str, str, bytes, str]]:
    """(method, path, body, content type) of requests a server must refuse with a 4xx; ``big``: with
    a 50 MB body and a 5 MB prompt."""
    j = lambda **kw: json.dumps(kw).encode()  # noqa: E731
    raw = lambda text: ("{" + f'"model": "{model}", ' + text + "}").encode()  # noqa: E731
    out = [("POST", "/v1/completions", raw('"prompt": "x", "temperature": NaN')),
           ("POST", "/v1/completions", raw('"prompt": "x", "top_p": NaN')),
           ("POST", "/v1/completions", raw('"prompt": "x", "temperature": Infinity')),
           ("POST", "/v1/completions", j(model=model, prompt="x", seed=2 ** 64)),
           ("POST", "/v1/completions", j(model=model, prompt="x", logprobs=5)),
           ("POST", "/v1/completions", j(model=model, prompt="x", echo=True)),
           ("POST", "/v1/completions", j(model=model, prompt="x", logit_bias={"5": 10})),
           ("POST", "/v1/completions", j(model=model, prompt="x", frobnicate=1)),
           ("POST", "/v1/completions", b"{not json"), ("POST", "/v1/completions", b"[1, 2]"),
           ("POST", "/v1/completions", j(prompt="x")), ("POST", "/v1/completions", j(model="nope", prompt="x")),
           ("POST", "/v1/completions", j(model=model)), ("POST", "/v1/completions", j(model=model, prompt=5)),
           ("POST", "/v1/completions", j(model=model, prompt="x", max_tokens=-1)),
           ("POST", "/v1/completions", j(model=model, prompt="x", max_tokens="8")),
           ("POST", "/v1/completions", j(model=model, prompt="x", temperature=5)),
           ("POST", "/v1/completions", j(model=model, prompt="x", top_p=0)),
           ("POST", "/v1/completions", j(model=model, prompt="x", n=99)),
           ("POST", "/v1/completions", j(model=model, prompt="x", stop=[""])),
           ("POST", "/v1/completions", j(model=model, prompt="word " * 5000)),
           ("POST", "/v1/chat/completions", j(model=model, messages="hi")),
           ("GET", "/v1/no-such-route", b"")]
    out = [(m, p, c, "application/json") for m, p, c in out] + \
        [("POST", "/v1/completions", j(model=model, prompt="x"), "text/plain")]
    if big:
        out += [("POST", "/v1/completions", j(model=model, prompt="x", pad="y" * (50 << 20)), "application/json"),
                ("POST", "/v1/completions", j(model=model, prompt="word " * (1 << 20)), "application/json")]
    return out


async def reliability(url: str, model: str, prompts: list[str], n: int, concurrency: int,
                      big: bool = True) -> pd.DataFrame:
    """``n`` requests, bad ones interleaved with good greedy ones, ``concurrency`` at a time: every
    good one must get the text its prompt got alone first (every third at a temperature so small it
    counts as greedy: 1e-300 or 1e-45), every bad one a 4xx, and the server must still answer
    /health at the end."""
    import httpx
    bad, good_prompts = bad_bodies(model, big), prompts[:8]
    body = lambda p, t=0.0: dict(model=model, prompt=p, max_tokens=8, temperature=t)  # noqa: E731
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        ref = [(await http.post("/v1/completions", json=body(p))).json()["choices"][0]["text"] for p in good_prompts]
        todo, rows = list(range(n)), []

        async def client():
            while todo:
                i = todo.pop(0)
                if i % 2:
                    method, path, content, kind = bad[(i // 2) % len(bad)]
                    r = await http.request(method, path, content=content, headers={"Content-Type": kind})
                    rows.append(dict(request=i, kind="bad", path=path, status=r.status_code,
                                     ok=400 <= r.status_code < 500 and "error" in r.json()))
                else:
                    k, t = (i // 2) % len(good_prompts), (0.0, 1e-300, 1e-45)[(i // 2) % 3]
                    r = await http.post("/v1/completions", json=body(good_prompts[k], t))
                    rows.append(dict(request=i, kind="good", path="/v1/completions", status=r.status_code,
                                     ok=r.status_code == 200 and r.json()["choices"][0]["text"] == ref[k]))
        await asyncio.gather(*(client() for _ in range(concurrency)))
        alive = (await http.get("/health")).status_code == 200
    return pd.DataFrame(rows).assign(alive_after=alive)


def configurations(args) -> dict[str, tuple[str, bool]]:
    """label -> (serving mode, continuous batching): --continuous applies to the batched modes."""
    out = {}
    for m in args.serve_modes:
        for c in (args.continuous if m in ("bass", "ar") else [True]):
            out[m if c or m not in ("bass", "ar") else f"{m} (no joining)"] = (m, c)
    return out


async def drive(args, prompts: list[str]) -> pd.DataFrame:
    labels = configurations(args)
    servers = {k: Server(m, args, c) for k, (m, c) in labels.items()}
    try:
        for s in servers.values():
            await s.ready()
        for s in servers.values():                         # warm-up: every batch size the levels reach
            for c in args.concurrency:
                await level(s.url, "bass-embedded", prompts, c, c, args.max_tokens, args.timeout_s)
        rows, names = [], list(labels)
        for c in args.concurrency:
            for rnd in range(args.rounds):                 # configurations interleaved, the order rotating
                for m in names[rnd % len(names):] + names[:rnd % len(names)]:
                    got, wall = await level(servers[m].url, "bass-embedded", prompts, c, args.requests,
                                            args.max_tokens, args.timeout_s)
                    rows += [dict(r, serve_mode=m, concurrency=c, round=rnd, level_wall_s=wall) for r in got]
                    print(f"{m} concurrency {c} round {rnd}: "
                          f"{sum(r['completion_tokens'] for r in got) / wall:.1f} tokens/s", flush=True)
        first = servers[next(iter(labels))]
        rel = await reliability(first.url, "bass-embedded", prompts, args.reliability, 8) if args.reliability \
            else pd.DataFrame()
        return pd.DataFrame(rows), rel
    finally:
        for s in servers.values():
            s.stop()


def summarise(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration and concurrency: tokens/s the median over rounds of a round's
    completion tokens over its wall time (with the slowest and fastest round beside it), TTFT and
    latency percentiles over every request of every round."""
    raw = raw.assign(round=raw["round"] if "round" in raw else 0)   # older raw.csv: one round
    out = []
    for (m, c), g in raw.groupby(["serve_mode", "concurrency"], sort=False):
        ok = g[g.status.astype(str) == "200"]
        def q(col, p, ok=ok):
            return float(np.percentile(ok[col].dropna(), p)) if ok[col].notna().any() else float("nan")
        per_round = ok.groupby("round").completion_tokens.sum() / g.groupby("round").level_wall_s.first()
        out.append(dict(serve_mode=m, concurrency=c, requests=len(g), failed=len(g) - len(ok), rounds=len(per_round),
                        tokens=int(ok.completion_tokens.sum()), wall_s=g.groupby("round").level_wall_s.first().sum(),
                        tokens_per_s=float(per_round.median()), tokens_per_s_min=float(per_round.min()),
                        tokens_per_s_max=float(per_round.max()),
                        ttft_p50_s=q("ttft_s", 50), ttft_p95_s=q("ttft_s", 95),
                        latency_p50_s=q("latency_s", 50), latency_p95_s=q("latency_s", 95),
                        latency_p99_s=q("latency_s", 99), mean_batch=ok.batch.mean(),
                        acceptance=ok.accepted.sum() / ok.drafted.sum() if ok.drafted.sum() else float("nan")))
    s = pd.DataFrame(out)
    base = s[s.serve_mode == "google"].set_index("concurrency").tokens_per_s
    s["vs_one_at_a_time"] = [t / base.get(c, float("nan")) for t, c in zip(s.tokens_per_s, s.concurrency)]
    return s


def markdown(s: pd.DataFrame) -> str:
    lines = ["| mode | concurrency | tokens/s (rounds' min-max) | vs one at a time | TTFT p50 (s) | "
             "latency p50 / p95 / p99 (s) | requests per generation (joining ones too) | failed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for _, r in s.sort_values(["concurrency", "serve_mode"]).iterrows():
        spread = f" ({r.tokens_per_s_min:.1f}-{r.tokens_per_s_max:.1f})" if r.rounds > 1 else ""
        lines.append(f"| {r.serve_mode} | {r.concurrency} | {r.tokens_per_s:.1f}{spread} | {r.vs_one_at_a_time:.2f}x | "
                     f"{r.ttft_p50_s:.2f} | {r.latency_p50_s:.2f} / {r.latency_p95_s:.2f} / {r.latency_p99_s:.2f} | "
                     f"{r.mean_batch:.1f} | {r.failed} |")
    return "\n".join(lines) + "\n"


def plot(s: pd.DataFrame, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m, g in s.groupby("serve_mode"):
        axes[0].plot(g.concurrency, g.tokens_per_s, marker="o", label=m)
        axes[1].plot(g.concurrency, g.latency_p99_s, marker="o", label=m)
    axes[0].set(xlabel="concurrent clients", ylabel="tokens/s", xscale="log", title="throughput")
    axes[1].set(xlabel="concurrent clients", ylabel="p99 latency (s)", xscale="log", title="p99 latency")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> None:
    args = parse(argv)
    prompts = [render_prompt(r) for r in load_dolly(args.dataset_path)[:args.prompts]]
    raw, rel = asyncio.run(drive(args, prompts))
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "raw.csv"), raw)
    s = summarise(raw)
    write_csv(os.path.join(args.out, "summary.csv"), s)
    table = markdown(s)
    if not rel.empty:
        write_csv(os.path.join(args.out, "reliability.csv"), rel)
        g = rel.groupby("kind").ok
        table += (f"\nReliability ({next(iter(configurations(args)))} server, {len(rel)} requests, 8 at a time): "
                  f"good answered "
                  f"correctly {int(g.sum().get('good', 0))} / {int(g.size().get('good', 0))}, bad refused with a 4xx "
                  f"{int(g.sum().get('bad', 0))} / {int(g.size().get('bad', 0))}, alive after: "
                  f"{bool(rel.alive_after.iloc[0])}\n")
    write_text(os.path.join(args.out, "table.md"), table)
    plot(s, os.path.join(args.out, "load.png"))
    print(fit_markdown(table, os.path.join(args.out, "table.md")))


def parse(argv=None):
    from sampling.app.scheduler import SERVE_MODES, SchedulerConfig
    d = SchedulerConfig()
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    ap.add_argument("--dataset_path", required=True, help="Dolly-format jsonl: the prompts")
    ap.add_argument("--prompts", type=int, default=48, help="records used as prompts, from the top")
    ap.add_argument("--serve_modes", default=",".join(SERVE_MODES), help="comma list of serving modes")
    ap.add_argument("--continuous", default="on,off",
                    help="comma list of on / off: bass and ar servers with continuous batching (requests join a "
                         "running batch) and without it (labelled 'no joining')")
    ap.add_argument("--concurrency", default="1,2,4,8,16", help="comma list of concurrent clients")
    ap.add_argument("--requests", type=int, default=32, help="requests per mode, concurrency and round")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds of every level, the configurations interleaved in rotating order; tokens/s is the "
                         "median round's")
    ap.add_argument("--max_tokens", type=int, default=32, help="max_tokens of every request")
    ap.add_argument("--max_batch", type=int, default=16, help="the servers' --max_batch")
    ap.add_argument("--max_wait_ms", type=float, default=d.max_wait_ms, help="the servers' --max_wait_ms")
    ap.add_argument("--timeout_s", type=float, default=300.0, help="per request")
    ap.add_argument("--reliability", type=int, default=200,
                    help="then this many requests, bad ones interleaved with good ones, on the first mode's server "
                         "(0: none)")
    ap.add_argument("--out", required=True, help="output folder (must not hold a raw.csv)")
    args = ap.parse_args(argv)
    args.serve_modes = [m.strip() for m in args.serve_modes.split(",") if m.strip()]
    bad = [m for m in args.serve_modes if m not in SERVE_MODES]
    if bad or not args.serve_modes:
        raise ValueError(f"--serve_modes {bad or args.serve_modes}: choose from {', '.join(SERVE_MODES)}")
    cont = [c.strip() for c in args.continuous.split(",") if c.strip()]
    if not cont or set(cont) - {"on", "off"}:
        raise ValueError(f"--continuous {args.continuous!r}: a comma list of on and off")
    args.continuous = [c == "on" for c in dict.fromkeys(cont)]
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        args.concurrency = []
    if not args.concurrency or min(args.concurrency) < 1:
        raise ValueError("--concurrency takes a comma list of integers >= 1")
    if args.reliability < 0:
        raise ValueError(f"--reliability must be >= 0, got {args.reliability}")
    check_at_least_one(args, "prompts", "requests", "max_tokens", "max_batch", "rounds")
    if os.path.exists(os.path.join(args.out, "raw.csv")):
        raise ValueError(f"{args.out}/raw.csv exists: choose another --out")
    return args


if __name__ == "__main__":
    run(main)
