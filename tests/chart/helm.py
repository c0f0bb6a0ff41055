"""Bridge from tests/chart.rs to the real Helm engine (helm-python-sdk: Helm v4 as a library) and
to the Kubernetes schemas (kubernetes-validate). The Rust tests hold the assertions; this prints
what Helm and the schemas say, as JSON on stdout.

    helm.py render CHART VALUES_JSON   -> {"manifests": {template: yaml}} or {"error": message}
    helm.py lint CHART VALUES_JSON     -> the lint report
    helm.py validate K8S_VERSION       -> reads YAML documents on stdin; [{"object", "error"}]
"""

import json
import sys


def render(chart, values):
    import helm_python as helm

    try:
        c = helm.Chart.load(chart)
        # Values go through the chart's values.schema.json before rendering, as `helm install` does.
        c.validate_schema(values)
        out = c.render(values, name="slotgate", namespace="slotgate-system", is_install=True)
        return {"manifests": out}
    except helm.HelmError as e:
        return {"error": str(e)}


def lint(chart, values):
    import helm_python as helm

    return helm.lint(chart, values, strict=True, namespace="slotgate-system", kube_version="v1.30.0")


def validate(version):
    import yaml
    import kubernetes_validate as kv

    problems = []
    for doc in yaml.safe_load_all(sys.stdin):
        if not doc:
            continue
        name = f'{doc.get("kind")}/{doc.get("metadata", {}).get("name")}'
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError as e:
            problems.append({"object": name, "error": "no schema: " + e.message, "schema_missing": True})
        except kv.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            problems.append({"object": name, "error": f"{path}: {e.message}"})
    return problems


def main():
    cmd = sys.argv[1]
    if cmd == "render":
        result = render(sys.argv[2], json.loads(sys.argv[3]))
    elif cmd == "lint":
        result = lint(sys.argv[2], json.loads(sys.argv[3]))
    elif cmd == "validate":
        result = validate(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {cmd}")
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
