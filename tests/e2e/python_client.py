"""The official Kubernetes Python client against a running wasmkube server.

Run by crates/cli/tests/e2e.rs with KUBECONFIG pointing at the server.
Exits non-zero on the first failed check.
"""

import threading

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

config.load_kube_config()
core = client.CoreV1Api()
apps = client.AppsV1Api()
NS = "pyclient"

core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))

# Create and list.
for i in range(3):
    core.create_namespaced_config_map(
        NS,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=f"cm-{i}", labels={"idx": str(i)}),
            data={"k": str(i)},
        ),
    )
# Every namespace also has the cluster's kube-root-ca.crt, as on Kubernetes.
OWN = "metadata.name!=kube-root-ca.crt"
listed = core.list_namespaced_config_map(NS, field_selector=OWN)
assert [c.metadata.name for c in listed.items] == ["cm-0", "cm-1", "cm-2"], listed.items
start_rv = listed.metadata.resource_version

# Paging with limit/continue.
page = core.list_namespaced_config_map(NS, limit=2, field_selector=OWN)
assert len(page.items) == 2 and page.metadata._continue
rest = core.list_namespaced_config_map(
    NS, limit=2, _continue=page.metadata._continue, field_selector=OWN
)
assert [c.metadata.name for c in rest.items] == ["cm-2"]

# Watch from a resourceVersion with bookmarks sees later changes in order.
seen = []
done = threading.Event()


def watcher():
    w = watch.Watch()
    for ev in w.stream(
        core.list_namespaced_config_map,
        NS,
        resource_version=start_rv,
        allow_watch_bookmarks=True,
        timeout_seconds=20,
    ):
        if ev["type"] == "BOOKMARK" or ev["object"].metadata.name == "kube-root-ca.crt":
            continue
        seen.append((ev["type"], ev["object"].metadata.name))
        if len(seen) == 3:
            w.stop()
    done.set()


t = threading.Thread(target=watcher)
t.start()
core.patch_namespaced_config_map("cm-1", NS, {"data": {"k": "patched"}})
core.create_namespaced_config_map(
    NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm-3"))
)
core.delete_namespaced_config_map("cm-0", NS)
assert done.wait(20), "watch did not deliver three events"
assert seen == [("MODIFIED", "cm-1"), ("ADDED", "cm-3"), ("DELETED", "cm-0")], seen

# Label selector.
sel = core.list_namespaced_config_map(NS, label_selector="idx in (1,2)")
assert sorted(c.metadata.name for c in sel.items) == ["cm-1", "cm-2"]

# 409 on a stale resourceVersion and on an existing name.
cm = core.read_namespaced_config_map("cm-2", NS)
cm.data = {"k": "first"}
core.replace_namespaced_config_map("cm-2", NS, cm)
cm.data = {"k": "stale"}
try:
    core.replace_namespaced_config_map("cm-2", NS, cm)
    raise AssertionError("stale update succeeded")
except ApiException as e:
    assert e.status == 409, e
try:
    core.create_namespaced_config_map(
        NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm-2"))
    )
    raise AssertionError("duplicate create succeeded")
except ApiException as e:
    assert e.status == 409 and "already exists" in e.body, e

# A Deployment with a strategic merge patch and the scale subresource.
dep = client.V1Deployment(
    metadata=client.V1ObjectMeta(name="web"),
    spec=client.V1DeploymentSpec(
        replicas=1,
        selector=client.V1LabelSelector(match_labels={"app": "web"}),
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels={"app": "web"}),
            spec=client.V1PodSpec(
                containers=[client.V1Container(name="web", image="img:1")]
            ),
        ),
    ),
)
apps.create_namespaced_deployment(NS, dep)
apps.patch_namespaced_deployment(
    "web", NS, {"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "img:2"}]}}}}
)
scale = apps.patch_namespaced_deployment_scale("web", NS, {"spec": {"replicas": 4}})
assert scale.spec.replicas == 4
got = apps.read_namespaced_deployment("web", NS)
assert got.spec.template.spec.containers[0].image == "img:2"
assert got.spec.replicas == 4 and got.metadata.generation == 3, got.metadata

# Delete; a missing object is 404.
apps.delete_namespaced_deployment("web", NS)
try:
    apps.read_namespaced_deployment("web", NS)
    raise AssertionError("deleted deployment still readable")
except ApiException as e:
    assert e.status == 404, e

print("all python client checks passed")
