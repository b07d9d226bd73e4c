{{/*
The operator's rights, least privilege. Namespaced rules go into a ClusterRole when every
namespace is watched, otherwise into a Role in each watched namespace.
*/}}
{{- define "gpupool.operatorNamespacedRules" -}}
# Pools and Subscriptions: kopf lists and watches them and merge-patches finalizers and
# annotations; the operator reads one by name. Nothing replaces them (no update).
- apiGroups: ["gpupool.dev"]
  resources: ["pools", "subscriptions"]
  verbs: ["get", "list", "watch", "patch"]
# Status is only ever merge-patched (the objects themselves are read through the main resource).
- apiGroups: ["gpupool.dev"]
  resources: ["pools/status", "subscriptions/status"]
  verbs: ["patch"]
# What the operator makes is owned by a Pool or Subscription with blockOwnerDeletion: true. Where
# the OwnerReferencesPermissionEnforcement admission plugin runs (OpenShift, hardened clusters),
# setting that needs update on the owner's finalizers subresource; without it every create is
# refused ("cannot set blockOwnerDeletion ..."). The subresource has no endpoint: this right
# allows nothing else.
- apiGroups: ["gpupool.dev"]
  resources: ["pools/finalizers", "subscriptions/finalizers"]
  verbs: ["update"]
# Key Secrets (one per Subscription), the upstream-key and open-keys Secrets (one per Pool): kopf
# watches key Secrets; the operator creates, patches and deletes them, and replaces (update) the
# open-keys Secret whole.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# One vLLM Deployment (watched by kopf) and Service per Pool, made or patched in place; the
# garbage collector deletes them with their Pool.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "patch"]
# vLLM pods, read only (watched, and listed per Pool): why a replica does not schedule.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Events on Pools and Subscriptions (gate flips, phase changes): core v1, each one created new.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{- define "gpupool.operatorClusterRules" -}}
# kopf lists and watches the CRDs to follow its resources (cluster-scoped, read only).
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
# kopf lists and watches namespaces to match its namespace patterns.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

{{/* The gateway only lists and watches Secrets (those labelled gpupool.dev/kind); it never
reads one by name. */}}
{{- define "gpupool.gatewayNamespacedRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["list", "watch"]
{{- end }}
