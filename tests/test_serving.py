"""serving.py: the OpenAI-compatible server over the scheduler, started in-process on a free
loopback port and spoken to with the real openai client and with raw HTTP."""
import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn
from openai import OpenAI
from tiny import noisy_copy, tiny_model, tiny_tokenizer

import serving
from benchmark.load_test import free_port
from sampling import generate
from sampling.app.scheduler import QueueFull, Scheduler, SchedulerConfig, ServeRequest

PROMPTS = ["Pack my box", "with five dozen liquor jugs and more words here", "jugs", "box with"]


@pytest.fixture(scope="module", params=["bass", "ar", "google"])
def server(request):
    tok = tiny_tokenizer()
    target = tiny_model("llama", vocab=len(tok), seed=41)
    draft = noisy_copy(target, 0.1, seed=42)
    sched = Scheduler(target, draft, tok, SchedulerConfig(mode=request.param, max_batch=8, max_wait_ms=50)).start()
    with served(sched, tok, serving.Limits("tiny", 128, 8)) as url:
        yield dict(url=url, tok=tok, target=target, draft=draft, mode=request.param, sched=sched)


@contextlib.contextmanager
def served(sched, tok, limits):
    """The app on a free loopback port in a thread; its URL. The scheduler stops with it."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(serving.create_app(sched, tok, limits), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
        sched.stop()


def offline(s, prompt: str, n: int) -> str:
    ids = torch.tensor([s["tok"](prompt)["input_ids"]])
    res = generate(s["target"], ids, mode="ar", max_new_tokens=n, temperature=0, eos_token_id=s["tok"].eos_token_id)
    return s["tok"].decode(res.tokens[0], skip_special_tokens=True)


def test_concurrent_greedy_requests_equal_offline_generation(server):
    """Requests of different lengths, budgets and temperatures, sent at once, share batches; each
    greedy answer is what sampling.generate gives for that prompt alone, whatever sampled rows
    shared its batch."""
    client = OpenAI(base_url=server["url"] + "/v1", api_key="none")
    jobs = [(p, 3 + 2 * i, 0.0 if i % 2 == 0 else 0.9) for i, p in enumerate(PROMPTS)] * 2
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda j: client.completions.create(model="tiny", prompt=j[0], max_tokens=j[1],
                                                                     temperature=j[2], top_p=0.9), jobs))
    for (prompt, n, t), a in zip(jobs, answers):
        if t == 0:
            assert a.choices[0].text == offline(server, prompt, n)
        assert 1 <= a.usage.completion_tokens <= n
        assert a.usage.prompt_tokens == len(server["tok"](prompt)["input_ids"])
    if server["mode"] == "bass":
        assert server["sched"].rows > server["sched"].batches             # some requests shared a batch
    extra = answers[0].model_extra["speculative"][0]
    assert (extra["drafted_tokens"] > 0) == (server["mode"] != "ar")


def test_stream_chat_and_models(server):
    client = OpenAI(base_url=server["url"] + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    whole = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    pieces = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in pieces if c.choices)
    assert text == whole.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "box"}], max_tokens=5,
                                          temperature=0.8, top_p=0.9, seed=3, n=2)
    assert len(chat.choices) == 2 and chat.usage.completion_tokens >= 2
    stop = whole.choices[0].text[2:5]
    if stop.strip():
        cut = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0, stop=[stop])
        assert cut.choices[0].text == whole.choices[0].text[:whole.choices[0].text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"


BAD = [
    (b"{not json", "not valid JSON"),
    (json.dumps([1, 2]), "must be a JSON object"),
    (json.dumps({"prompt": "x"}), "model is required"),
    (json.dumps({"model": "gpt-9", "prompt": "x"}), "unknown model 'gpt-9'"),
    (json.dumps({"model": "tiny"}), "prompt must be a non-empty string"),
    (json.dumps({"model": "tiny", "prompt": 5}), "prompt must be a non-empty string"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "9"}), "max_tokens must be an integer"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 0}), r"max_tokens must be in \[1, 128\]"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": 3}), r"temperature must be in \[0, 2\]"),
    (json.dumps({"model": "tiny", "prompt": "x", "top_p": 0}), r"top_p must be in \(0, 1\]"),
    (json.dumps({"model": "tiny", "prompt": "x", "n": 9}), r"n must be in \[1, 4\]"),
    (json.dumps({"model": "tiny", "prompt": "x", "stop": [""]}), "stop must be"),
    (json.dumps({"model": "tiny", "prompt": "x " * 200, "max_tokens": 8}), "exceed the model's 128 positions"),
]


def test_bad_inputs_interleaved_with_good_ones(server):
    """Every bad request is a 400 with an OpenAI-style error body, the good ones between them are
    answered, an unknown route is a 404, and the server is alive at the end."""
    import re
    good = offline(server, PROMPTS[0], 4)
    with httpx.Client(base_url=server["url"], timeout=60) as http:
        for body, msg in BAD * 2:
            r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and re.search(msg, r.json()["error"]["message"]), (body, r.text)
            ok = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4,
                                                    "temperature": 0})
            assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == good
        bad_chat = http.post("/v1/chat/completions", json={"model": "tiny", "messages": "hi"})
        assert bad_chat.status_code == 400 and bad_chat.json()["error"]["param"] == "messages"
        missing = http.get("/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        assert http.get("/health").json()["status"] == "ok"


def test_a_full_queue_refuses_at_once():
    tok = tiny_tokenizer()
    target = tiny_model("llama", vocab=len(tok), seed=41)
    sched = Scheduler(target, None, tok, SchedulerConfig(mode="ar", queue_size=2))     # not started: nothing drains
    for _ in range(2):
        sched.submit(ServeRequest(ids=[1, 2], max_tokens=2))
    with pytest.raises(QueueFull):
        sched.submit(ServeRequest(ids=[1, 2], max_tokens=2))
    with pytest.raises(ValueError, match="unknown serving mode 'fast'"):
        SchedulerConfig(mode="fast").validate()


def test_a_cancelled_row_leaves_the_batch_and_the_others_are_unchanged():
    """A request whose client leaves mid-generation stops its row; the other greedy rows of the batch
    get exactly their offline tokens (a sampled row shares the batch)."""
    tok = tiny_tokenizer()
    target = tiny_model("llama", vocab=len(tok), seed=41)
    draft = noisy_copy(target, 0.1, seed=42)
    sched = Scheduler(target, draft, tok, SchedulerConfig(mode="bass"))
    got, done = {}, {}
    reqs = []
    for i, p in enumerate(PROMPTS):
        r = ServeRequest(ids=tok(p)["input_ids"], max_tokens=10, temperature=0.8 if i == 2 else 0.0, top_k=5,
                         seed=3 + i)                           # seeded: the same draws every run
        r.on_tokens = lambda t, i=i: got.setdefault(i, []).extend(t)
        r.on_done = lambda s, e, i=i: done.__setitem__(i, (s, e))
        reqs.append(r)

    def leave(t, r=reqs[1]):                                   # row 1's client leaves after its first tokens
        got.setdefault(1, []).extend(t)
        r.cancelled = True
    reqs[1].on_tokens = leave
    sched._decode(reqs)
    assert len(got[1]) < 10
    assert got[2] == done[2][0]["tokens"] and 1 <= len(got[2]) <= 10
    for i in (0, 3):
        ids = torch.tensor([tok(PROMPTS[i])["input_ids"]])
        ref = generate(target, ids, mode="ar", max_new_tokens=10, temperature=0,
                       eos_token_id=tok.eos_token_id).tokens[0]
        assert got[i] == ref == done[i][0]["tokens"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tiny import save_tiny_pair
    return save_tiny_pair(tmp_path_factory.mktemp("pair"), positions=512)


def test_sigterm_finishes_the_request_in_flight(pair):
    """serving.py as a subprocess: SIGTERM while a streamed request runs; the request completes
    ([DONE]) and the process exits cleanly."""
    import os
    import signal
    import subprocess
    import sys
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "serving.py", "--port", str(port), "--dtype", "float32",
                             "--target_model_name", pair["target"],
                             "--approx_model_name", pair["draft"], "--model_id", "tiny"], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        lines = []
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "Pack my box", "max_tokens": 200, "temperature": 0.9,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if line and not lines:
                    proc.send_signal(signal.SIGTERM)                   # the first chunk is out
                lines.append(line)
        assert lines[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in lines
        assert proc.wait(60) == 0, proc.stdout.read()
        said = proc.stdout.read().splitlines()
        assert said[0] == "loading models ..." and said[1].startswith("serving tiny (bass") \
            and said[1].endswith(f"on http://127.0.0.1:{port}"), said
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_taken_port_is_one_line_and_exit_code_2(pair):
    import os
    import socket
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "serving.py", "--port", str(port), "--target_model_name",
                               pair["target"], "--approx_model_name", pair["draft"]], cwd=root,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""           # nothing announced
    assert proc.stderr.splitlines() == ["loading models ...", f"error: cannot listen on 127.0.0.1:{port}: address "
                                        "already in use (another server there? pick another --port)"], proc.stderr


def test_load_test_runs_on_a_tiny_pair(pair, capsys, tmp_path):
    import pandas as pd
    from test_benchmark import FIXTURE, cli

    from benchmark import load_test
    out = tmp_path / "load"
    code, stdout, err = cli(load_test, ["--dataset_path", FIXTURE, "--prompts", "4", "--concurrency", "1,2",
                                        "--requests", "3", "--rounds", "2", "--max_tokens", "4", "--reliability", "20",
                                        "--target_model_name", pair["target"], "--approx_model_name", pair["draft"],
                                        "--out", str(out)], capsys)
    assert code == 0, err
    s = pd.read_csv(out / "summary.csv")
    assert set(s.serve_mode) == {"bass", "ar", "google", "bass (no joining)", "ar (no joining)"}
    assert (s.failed == 0).all() and (s.tokens > 0).all() and (s.rounds == 2).all()
    assert (s.tokens_per_s_min <= s.tokens_per_s).all() and (s.tokens_per_s <= s.tokens_per_s_max).all()
    rel = pd.read_csv(out / "reliability.csv")
    assert rel.ok.all() and rel.alive_after.all() and len(rel) == 20


@pytest.mark.parametrize("mode", ("bass", "ar"))
@pytest.mark.parametrize("continuous", (True, False))
def test_requests_join_a_running_batch(mode, continuous):
    """Requests submitted one by one while batches run (no wait for company): with continuous
    batching they join the running batch between steps (fewer batches, rows joining), without it
    each waits for the batch in flight to end; every greedy answer equals offline generation."""
    tok = tiny_tokenizer()
    target = tiny_model("llama", vocab=len(tok), seed=41, dtype=torch.float32)
    draft = noisy_copy(target, 0.1, seed=42)
    sched = Scheduler(target, draft, tok, SchedulerConfig(mode=mode, max_batch=4, max_wait_ms=0,
                                                          continuous=continuous)).start()
    prompts = PROMPTS + ["The quick brown fox jumps over", "lazy"]
    done, n = {}, 18
    for i in range(n):
        r = ServeRequest(ids=tok(prompts[i % len(prompts)])["input_ids"], max_tokens=6 + i % 5, temperature=0.0)
        r.on_done = lambda s, e, i=i: done.__setitem__(i, (s, e))
        sched.submit(r)
        time.sleep(0.003)
    t0 = time.monotonic()
    while len(done) < n and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    sched.stop()
    for i in range(n):
        ids = torch.tensor([tok(prompts[i % len(prompts)])["input_ids"]])
        ref = generate(target, ids, mode="ar", max_new_tokens=6 + i % 5, temperature=0, eos_token_id=tok.eos_token_id)
        stats, err = done[i]
        assert err is None and stats["tokens"] == ref.tokens[0], i
    assert sched.rows == n and max(s["batch"] for s, _ in done.values()) > 1
    if continuous:
        assert sched.batches <= 3


def scheduler_pair(mode="bass", **cfg):
    tok = tiny_tokenizer()
    target = tiny_model("llama", vocab=len(tok), seed=41, dtype=torch.float32)
    draft = noisy_copy(target, 0.1, seed=42)
    return tok, target, draft, Scheduler(target, draft, tok, SchedulerConfig(mode=mode, **cfg))


def greedy_alone(tok, target, ids, n):
    return generate(target, torch.tensor([ids]), mode="ar", max_new_tokens=n, temperature=0,
                    eos_token_id=tok.eos_token_id).tokens[0]


def tracked(req, log):
    """Record every event of a request in ``log``: (kind, request, value)."""
    req.on_tokens = lambda t: log.append(("tokens", req, list(t)))
    req.on_done = lambda s, e: log.append(("done", req, (s, e)))
    return req


@pytest.mark.parametrize("mode", ("bass", "ar"))
def test_a_short_request_is_answered_when_its_row_finishes(mode):
    """A short and a long request in one batch: the short one is answered at once when its row is
    finished, while the long one is still being decoded; both equal offline generation."""
    tok, target, draft, sched = scheduler_pair(mode)
    log = []
    long_ids, short_ids = tok(PROMPTS[1])["input_ids"], tok(PROMPTS[0])["input_ids"]
    long = tracked(ServeRequest(ids=long_ids, max_tokens=40, temperature=0.0), log)
    short = tracked(ServeRequest(ids=short_ids, max_tokens=3, temperature=0.0), log)
    sched._decode([long, short])
    when = next(i for i, (kind, r, _) in enumerate(log) if kind == "done" and r is short)
    long_tokens_then = sum(len(v) for kind, r, v in log[:when] if kind == "tokens" and r is long)
    assert long_tokens_then < 40 and not any(kind == "done" and r is long for kind, r, _ in log[:when])
    assert short.tokens == greedy_alone(tok, target, short_ids, 3)
    assert long.tokens == greedy_alone(tok, target, long_ids, 40)
    assert log[-1][0] == "done" and log[-1][1] is long and log[-1][2][0]["tokens"] == long.tokens


@pytest.mark.parametrize("mode", ("bass", "ar", "google"))
def test_a_row_that_fails_inside_the_loop_fails_alone(mode):
    """A request whose law overflows (temperature 1e-300, let through below the server's checks)
    fails alone with its cause; the other rows of its batch get their offline tokens."""
    tok, target, draft, sched = scheduler_pair(mode)
    log, reqs = [], []
    for i, p in enumerate(PROMPTS):
        reqs.append(tracked(ServeRequest(ids=tok(p)["input_ids"], max_tokens=8,
                                         temperature=1e-300 if i == 1 else 0.0), log))
    sched._decode(reqs)
    results = {id(r): v for kind, r, v in log if kind == "done"}
    stats, error = results[id(reqs[1])]
    assert stats is None and error
    for i in (0, 2, 3):
        stats, error = results[id(reqs[i])]
        assert error is None and stats["tokens"] == greedy_alone(tok, target, reqs[i].ids, 8), i


def test_an_exception_in_a_batch_fails_only_the_request_that_causes_it(monkeypatch):
    """The draft model raises whenever it sees one request's prompt: that batch fails, each of its
    unfinished requests resumes alone, and only the culprit fails; the others get their offline
    tokens."""
    from sampling import control
    # the controller's pricing passes feed random tokens: priced flat here, so no pass but the requests' runs
    flat = control.CostTable((1,), (control.CostCurve((1,), (1.0,)),))
    monkeypatch.setattr(control, "pass_costs", lambda model, cache: flat)
    tok, target, draft, sched = scheduler_pair("bass")
    prompts = PROMPTS[:2] + ["Speculative decoding drafts"] + PROMPTS[3:]
    marker = tok(prompts[2])["input_ids"][0]
    assert all(marker not in tok(p)["input_ids"] for i, p in enumerate(prompts) if i != 2)

    def fault(module, args):
        if marker in args[0]:
            raise RuntimeError("an injected fault")
    # on its input embedding: a draft's lean passes call the model's modules, not its forward
    handle = draft.get_input_embeddings().register_forward_pre_hook(fault)
    try:
        log, reqs = [], [tracked(ServeRequest(ids=tok(p)["input_ids"], max_tokens=6, temperature=0.0), [])
                         for p in prompts]
        for r in reqs:
            tracked(r, log)
        sched._decode(reqs)
    finally:
        handle.remove()
    results = {id(r): v for kind, r, v in log if kind == "done"}
    assert results[id(reqs[2])] == (None, "RuntimeError: an injected fault")
    for i in (0, 1, 3):
        stats, error = results[id(reqs[i])]
        assert error is None and stats["tokens"] == greedy_alone(tok, target, reqs[i].ids, 6), i


def test_a_seeded_request_is_the_same_whatever_shares_its_batch():
    """A sampled request with a seed gives the same tokens alone and in a batch of other sampled
    requests (each row draws its own values and drafts its own length)."""
    tok, target, draft, sched = scheduler_pair("bass")
    ids = tok(PROMPTS[1])["input_ids"]
    alone = ServeRequest(ids=ids, max_tokens=12, temperature=1.0, seed=77)
    sched._decode([alone])
    mates = [ServeRequest(ids=tok(p)["input_ids"], max_tokens=5 + i, temperature=0.9) for i, p in enumerate(PROMPTS)]
    again = ServeRequest(ids=ids, max_tokens=12, temperature=1.0, seed=77)
    sched._decode(mates[:2] + [again] + mates[2:])
    assert again.tokens == alone.tokens and len(alone.tokens) > 0


@pytest.fixture(scope="module")
def guarded():
    """A bass server with an API key, a 4 KiB body limit and a queue of 4 (not every test needs the
    models busy: the key and the checks come first)."""
    tok = tiny_tokenizer()
    target = tiny_model("llama", vocab=len(tok), seed=41)
    draft = noisy_copy(target, 0.1, seed=42)
    sched = Scheduler(target, draft, tok, SchedulerConfig(mode="bass", max_batch=2, max_wait_ms=0,
                                                          queue_size=4)).start()
    limits = serving.Limits("tiny", 128, 8, max_body_bytes=4096, api_key="sesame",
                            max_token_chars=serving.longest_token(tok))
    with served(sched, tok, limits) as url:
        yield dict(url=url, tok=tok, target=target, sched=sched)


KEY = {"Authorization": "Bearer sesame"}


def test_the_api_key_is_required(guarded):
    with httpx.Client(base_url=guarded["url"], timeout=60) as http:
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            r = http.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/v1/completions", json=body, headers=KEY).status_code == 200
        assert http.get("/health").status_code == 200                     # open: health and metrics
        client = OpenAI(base_url=guarded["url"] + "/v1", api_key="sesame")
        assert client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0).choices


CHECKED = [
    ('{"model": "tiny", "prompt": "x", "temperature": NaN}', "application/json", 400, "NaN, which is not a JSON"),
    ('{"model": "tiny", "prompt": "x", "top_p": Infinity}', "application/json", 400, "Infinity"),
    (json.dumps({"model": "tiny", "prompt": "x", "seed": 2 ** 64}), "application/json", 400, r"seed must be in"),
    (json.dumps({"model": "tiny", "prompt": "x", "logprobs": 5}), "application/json", 400, "logprobs is not supported"),
    (json.dumps({"model": "tiny", "prompt": "x", "echo": True}), "application/json", 400, "echo is not supported"),
    (json.dumps({"model": "tiny", "prompt": "x", "logit_bias": {"5": 1}}), "application/json", 400,
     "logit_bias is not supported"),
    (json.dumps({"model": "tiny", "prompt": "x", "frobnicate": 1}), "application/json", 400, "unknown field"),
    (json.dumps({"model": "tiny", "prompt": "x"}), "text/plain", 415, "must be JSON"),
    (json.dumps({"model": "tiny", "prompt": "x" * 5000}), "application/json", 413, "over this server's limit"),
]


def test_bad_requests_are_refused_with_the_right_status(guarded):
    import re
    with httpx.Client(base_url=guarded["url"], timeout=60) as http:
        for body, kind, status, message in CHECKED:
            r = http.post("/v1/completions", content=body, headers=dict(KEY, **{"Content-Type": kind}))
            assert r.status_code == status and re.search(message, r.json()["error"]["message"]), (body[:60], r.text)
        greedy = http.post("/v1/completions", headers=KEY, json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4,
                                                                 "temperature": 0}).json()["choices"][0]["text"]
        for t in (1e-300, 1e-45, 1e-38):                                   # below the floor: greedy
            r = http.post("/v1/completions", headers=KEY, json={"model": "tiny", "prompt": PROMPTS[0],
                                                                "max_tokens": 4, "temperature": t})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy
        default = http.post("/v1/completions", headers=KEY, json={"model": "tiny", "prompt": "x", "logprobs": None,
                                                                  "echo": False, "max_tokens": 2})
        assert default.status_code == 200                                  # the fields' "not used" values


def test_usage_in_a_stream_only_when_asked(guarded):
    with httpx.Client(base_url=guarded["url"], timeout=60, headers=KEY) as http:
        for ask in (True, False):
            body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 3, "stream": True}
            if ask:
                body["stream_options"] = {"include_usage": True}
            lines = [json.loads(x[6:]) for x in http.post("/v1/completions", json=body).text.splitlines()
                     if x.startswith("data: {")]
            assert any("usage" in x for x in lines) == ask


def test_metrics_count_requests_tokens_and_drafts(guarded):
    with httpx.Client(base_url=guarded["url"], timeout=60, headers=KEY) as http:
        http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0})
        text = http.get("/metrics").text
    for name in ("bass:requests_total", "bass:prompt_tokens_total", "bass:generation_tokens_total",
                 "bass:time_to_first_token_seconds_bucket", "bass:inter_token_latency_seconds_bucket",
                 "bass:num_requests_waiting", "bass:num_requests_running", "bass:batch_size_bucket",
                 "bass:spec_decode_num_drafts_total", "bass:spec_decode_num_draft_tokens_total",
                 "bass:spec_decode_num_accepted_tokens_total"):
        assert name in text, name
    drafts = float(next(x.split()[-1] for x in text.splitlines() if x.startswith("bass:spec_decode_num_drafts_total")))
    assert drafts > 0 and 'status="200"' in text and 'status="413"' in text


def test_a_client_that_leaves_stops_its_row_and_a_full_queue_says_when_to_retry(guarded):
    """A non-streaming client that gives up: its row stops (counted as 499); with the queue full, a
    429 with Retry-After; the server then answers as before."""
    url = guarded["url"]
    slow = guarded["target"].register_forward_pre_hook(lambda m, a: time.sleep(0.02))   # a pass takes 20 ms
    try:
        with httpx.Client(base_url=url, timeout=0.3, headers=KEY) as http:
            with pytest.raises(httpx.TimeoutException):
                http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 110,
                                                   "temperature": 0})            # 110 tokens, no EOS among them
        t0 = time.monotonic()
        while guarded["sched"].running and time.monotonic() - t0 < 20:
            time.sleep(0.05)
        assert guarded["sched"].running == 0 and time.monotonic() - t0 < 2      # stopped, not run to its end
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda i: httpx.post(url + "/v1/completions", headers=KEY, timeout=120,
                                                       json={"model": "tiny", "prompt": PROMPTS[i % 4],
                                                             "max_tokens": 20, "temperature": 1.0, "seed": i}),
                                  range(16)))
    finally:
        slow.remove()
    refused = [r for r in codes if r.status_code == 429]
    assert refused and all(r.headers["retry-after"] == "1" for r in refused)
    assert all(r.status_code == 200 for r in codes if r.status_code != 429)
    assert guarded["sched"].waiting <= 4
    metrics = httpx.get(url + "/metrics").text
    assert 'status="499"' in metrics
