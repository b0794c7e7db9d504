#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/ without a cluster:
#   1. every YAML file parses;
#   2. every manifest validates against the Kubernetes OpenAPI schemas, strictly (unknown fields
#      are errors), for the oldest supported Kubernetes (1.30: the preStop `sleep` handler) and
#      for the newest version the validator bundles;
#   3. kustomization.yaml lists files that exist, and every manifest it leaves out is meant to be
#      left out (secret.yaml, a template);
#   4. the pieces fit together: selectors, the Service's target port, the Secret's keys, the
#      ConfigMap's TOML (parses, and names only keys of config/default.toml), the --config path
#      and the grace period against the shutdown settings.
#
# Needs bash and python3 with pip; the validator, the PyPI package kubernetes-validate (which
# bundles the schemas, so validation itself is offline), is installed on first use into
# ~/.cache/switchyard-kubevalidate (no root, nothing system-wide).
#
# Usage: scripts/validate-deploy.sh [DEPLOY_DIR]        (default: deploy/ of this repository)
# Environment: PYTHON (default python3), SWITCHYARD_KUBEVALIDATE_DIR (install directory),
#              KUBERNETES_VALIDATE_SPEC (pip requirement, default kubernetes-validate==1.37.0).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPLOY=$(cd "${1:-$ROOT/deploy}" && pwd)
DEFAULT_TOML="$ROOT/config/default.toml"
PYTHON=${PYTHON:-python3}
TARGET=${SWITCHYARD_KUBEVALIDATE_DIR:-$HOME/.cache/switchyard-kubevalidate}
SPEC=${KUBERNETES_VALIDATE_SPEC:-kubernetes-validate==1.37.0}
MIN_K8S=1.30.0
# Manifests kept in deploy/ but deliberately not in kustomization.yaml.
NOT_IN_KUSTOMIZATION="secret.yaml"

export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

# --- the validator -------------------------------------------------------------------------------
# tomllib is in the standard library from Python 3.11; older ones get tomli beside the validator.
need=()
"$PYTHON" -c 'import kubernetes_validate, yaml' 2>/dev/null || need+=("$SPEC")
"$PYTHON" -c 'import tomllib' 2>/dev/null || "$PYTHON" -c 'import tomli' 2>/dev/null || need+=(tomli)
if ((${#need[@]})); then
    echo "installing ${need[*]} into $TARGET"
    # --target installs outside the system's site-packages (allowed under PEP 668);
    # --upgrade replaces what an earlier, unusable install (another Python) left there.
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --upgrade --target "$TARGET" "${need[@]}"
fi
VALIDATOR_VERSION=$("$PYTHON" -c 'from kubernetes_validate.version import __version__; print(__version__)')
NEWEST_K8S=$("$PYTHON" -c 'import kubernetes_validate.utils as u; print(u.latest_version())')
if ! "$PYTHON" - "$NEWEST_K8S" "$MIN_K8S" <<'EOF'; then
import sys
newest, oldest = (tuple(int(p) for p in v.split(".")[:2]) for v in sys.argv[1:3])
sys.exit(0 if newest >= oldest else 1)
EOF
    echo "FAIL kubernetes-validate $VALIDATOR_VERSION bundles schemas up to $NEWEST_K8S only; need >= $MIN_K8S" >&2
    exit 1
fi
echo "validator: kubernetes-validate $VALIDATOR_VERSION, strict schemas of Kubernetes $MIN_K8S and $NEWEST_K8S"

shopt -s nullglob
files=("$DEPLOY"/*.yaml "$DEPLOY"/*.yml)
if ((${#files[@]} == 0)); then
    echo "FAIL no YAML files in $DEPLOY" >&2
    exit 1
fi

failures=0
yaml_failed=0
fail() { echo "FAIL $*"; failures=$((failures + 1)); }

# --- 1 and 2: parse, then schema-validate each file ----------------------------------------------
for file in "${files[@]}"; do
    rel=${file#"$ROOT"/}
    if ! kinds=$("$PYTHON" - "$file" 2>&1 <<'EOF'
import sys, yaml
try:
    with open(sys.argv[1]) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    sys.exit("%s%s" % (getattr(e, "problem", None) or e,
                       " at line %d, column %d" % (mark.line + 1, mark.column + 1) if mark else ""))
if not docs:
    sys.exit("no YAML document")
for d in docs:
    if not isinstance(d, dict) or "kind" not in d:
        sys.exit("a document without `kind`")
print(" ".join("/".join([d["kind"]] + [n for n in [(d.get("metadata") or {}).get("name")] if n]) for d in docs))
EOF
    ); then
        fail "$rel: YAML: ${kinds##*$'\n'}"
        yaml_failed=1
        continue
    fi
    if [[ $(basename "$file") == kustomization.y*ml ]]; then
        echo "ok   $rel: $kinds (parses; not a Kubernetes object, checked below)"
        continue
    fi
    # The CLI only warns (exit 0) on a kind/apiVersion it has no schema for: anything but
    # INFO lines counts as a failure here.
    if out=$("$PYTHON" -m kubernetes_validate --strict -k "$MIN_K8S" -k "$NEWEST_K8S" "$file" 2>&1) \
        && ! grep -qv '^INFO ' <<<"$out"; then
        echo "ok   $rel: $kinds (valid, strict, Kubernetes $MIN_K8S and $NEWEST_K8S)"
    else
        fail "$rel: $kinds"
        grep -v '^INFO ' <<<"$out" | sed 's/^/     /'
    fi
done

# --- 3 and 4: kustomization and consistency ------------------------------------------------------
if ((yaml_failed)); then
    echo "skip consistency checks: fix the YAML errors above first"
elif ! "$PYTHON" - "$DEPLOY" "$DEFAULT_TOML" "$ROOT" "$NOT_IN_KUSTOMIZATION" <<'EOF'; then
import glob, os, sys, yaml
try:
    import tomllib
except ImportError:
    import tomli as tomllib

deploy, default_toml, root, excluded = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()
failed = False

def check(ok, what, why=""):
    global failed
    print(("ok   " if ok else "FAIL ") + what + ("" if ok else ": " + why))
    failed |= not ok

objects = {}
for path in sorted(glob.glob(os.path.join(deploy, "*.y*ml"))):
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if doc and doc.get("kind") != "Kustomization":
                objects[(doc["kind"], doc["metadata"]["name"])] = (doc, os.path.basename(path))

def one(kind):
    found = [v for (k, _), v in objects.items() if k == kind]
    if len(found) != 1:
        check(False, "one %s" % kind, "found %d" % len(found))
        return None, None
    return found[0]

# kustomization.yaml
kpath = os.path.join(deploy, "kustomization.yaml")
if not os.path.exists(kpath):
    check(False, "kustomization.yaml", "missing")
else:
    with open(kpath) as f:
        k = yaml.safe_load(f)
    listed = k.get("resources") or []
    missing = [r for r in listed if not os.path.exists(os.path.join(deploy, r))]
    check(not missing, "kustomization.yaml resources exist", "missing %s" % missing)
    manifests = {name for _, name in objects.values()}
    unlisted = sorted(manifests - set(listed) - set(excluded))
    check(not unlisted, "kustomization.yaml lists every manifest (except %s)" % ", ".join(excluded),
          "not listed: %s" % unlisted)
    wrongly = sorted(set(listed) & set(excluded))
    check(not wrongly, "kustomization.yaml leaves out the Secret template", "listed: %s" % wrongly)

dep, _ = one("Deployment")
svc, _ = one("Service")
hpa, _ = one("HorizontalPodAutoscaler")
pdb, _ = one("PodDisruptionBudget")
cm, _ = one("ConfigMap")
secret, _ = one("Secret")
if not all(x is not None for x in (dep, svc, hpa, pdb, cm, secret)):
    sys.exit(1)

pod = dep["spec"]["template"]
labels = pod["metadata"]["labels"]
ctr = pod["spec"]["containers"][0]
matches = lambda sel: bool(sel) and all(labels.get(k) == v for k, v in sel.items())
check(labels.get("app.kubernetes.io/name") == "switchyard", "pod label app.kubernetes.io/name=switchyard")
check(matches(dep["spec"]["selector"]["matchLabels"]), "Deployment selector matches its pods")
check(matches(svc["spec"]["selector"]), "Service selector matches the pods")
check(matches(pdb["spec"]["selector"]["matchLabels"]), "PodDisruptionBudget selector matches the pods")
ref = hpa["spec"]["scaleTargetRef"]
check(ref["kind"] == "Deployment" and ref["name"] == dep["metadata"]["name"],
      "HPA targets Deployment/%s" % dep["metadata"]["name"], "targets %s/%s" % (ref["kind"], ref["name"]))
port_names = {p.get("name") for p in ctr.get("ports", [])}
check(all(p["targetPort"] in port_names for p in svc["spec"]["ports"]),
      "Service targetPort names a container port", "container ports: %s" % sorted(port_names))

# Secret references
keys = set((secret.get("stringData") or {}).keys()) | set((secret.get("data") or {}).keys())
refs = [e["valueFrom"]["secretKeyRef"] for e in ctr.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
bad = [r["key"] for r in refs if r["name"] != secret["metadata"]["name"] or r["key"] not in keys]
check(refs and not bad, "env secretKeyRefs name keys of Secret/%s" % secret["metadata"]["name"], "unknown: %s" % bad)
want = {"SWITCHYARD_ADMIN_TOKEN", "SWITCHYARD_MASTER_KEY", "SWITCHYARD_DATABASE_URL", "SWITCHYARD_REDIS_URL"}
check(want <= {e["name"] for e in ctr.get("env", [])}, "env sets the four secret variables")

# The ConfigMap's TOML against config/default.toml
with open(default_toml, "rb") as f:
    defaults = tomllib.load(f)
toml_text = cm["data"].get("switchyard.toml")
settings = {}
if toml_text is None:
    check(False, "ConfigMap holds switchyard.toml", "no such key")
else:
    try:
        settings = tomllib.loads(toml_text)
        unknown = ["%s.%s" % (s, key) for s, table in settings.items()
                   for key in (table if isinstance(table, dict) else {None: 0})
                   if s not in defaults or key not in defaults[s]]
        check(not unknown, "switchyard.toml parses and uses only keys of %s" % os.path.relpath(default_toml, root),
              "unknown: %s" % unknown)
    except tomllib.TOMLDecodeError as e:
        check(False, "switchyard.toml parses", str(e))

# --config points into the mounted ConfigMap
args = ctr.get("args", [])
config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
mounted = set()
vols = {v["name"]: v for v in pod["spec"].get("volumes", [])}
for m in ctr.get("volumeMounts", []):
    v = vols.get(m["name"], {}).get("configMap")
    if v and v.get("name") == cm["metadata"]["name"]:
        for item in v.get("items") or [{"path": k} for k in cm["data"]]:
            mounted.add(os.path.join(m["mountPath"], item["path"]))
check(config_path in mounted, "--config %s is the mounted ConfigMap file" % config_path, "mounted: %s" % sorted(mounted))

# Grace period covers preStop + drain + last metering flush
def setting(section, key):
    return settings.get(section, {}).get(key, defaults[section][key])
pre = ((ctr.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
need = pre + setting("server", "shutdown_timeout_secs") + setting("metering", "shutdown_flush_secs")
grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
check(grace > need, "terminationGracePeriodSeconds %d > preStop %d + shutdown_timeout_secs %d + shutdown_flush_secs %d"
      % (grace, pre, setting("server", "shutdown_timeout_secs"), setting("metering", "shutdown_flush_secs")),
      "raise it or shorten the drain")
sys.exit(1 if failed else 0)
EOF
    failures=$((failures + 1))
fi

if ((failures)); then
    echo "validate-deploy: FAILED ($failures failure(s))"
    exit 1
fi
echo "validate-deploy: all ${#files[@]} files passed"
