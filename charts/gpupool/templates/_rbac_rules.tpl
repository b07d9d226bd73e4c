{{/*
The operator's rights, least privilege. Namespaced rules go into a ClusterRole when every
namespace is watched, otherwise into a Role in each watched namespace.
*/}}
{{- define "gpupool.operatorNamespacedRules" -}}
# Pools and Subscriptions: kopf watches them and patches finalizers, annotations and status.
- apiGroups: ["gpupool.dev"]
  resources: ["pools", "subscriptions"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["gpupool.dev"]
  resources: ["pools/status", "subscriptions/status"]
  verbs: ["get", "patch", "update"]
# What the operator makes is owned by a Pool or Subscription with blockOwnerDeletion: true. Where
# the OwnerReferencesPermissionEnforcement admission plugin runs (OpenShift, hardened clusters),
# setting that needs update on the owner's finalizers subresource; without it every create is
# refused ("cannot set blockOwnerDeletion ..."). The subresource has no endpoint: this right
# allows nothing else.
- apiGroups: ["gpupool.dev"]
  resources: ["pools/finalizers", "subscriptions/finalizers"]
  verbs: ["update"]
# Key Secrets (one per Subscription), the upstream-key and open-keys Secrets (one per Pool).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# One vLLM Deployment and Service per Pool.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# vLLM pods, read only: why a replica does not schedule.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Events on Pools and Subscriptions (gate flips, phase changes).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{- define "gpupool.operatorClusterRules" -}}
# kopf scans the CRDs to resolve its resources (cluster-scoped, read only).
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
# kopf lists namespaces to match its namespace patterns.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* The gateway only reads Secrets (it selects those labelled gpupool.dev/kind). */}}
{{- define "gpupool.gatewayNamespacedRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
{{- end }}
