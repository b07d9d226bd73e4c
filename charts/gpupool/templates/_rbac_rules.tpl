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
{{- if .Values.admission.enabled }}
# Admission webhooks: the operator reads the chart's ValidatingWebhookConfiguration and writes the
# CA of the certificate it serves into its caBundle; that one object, by name. It cannot create
# or delete webhook configurations.
- apiGroups: ["admissionregistration.k8s.io"]
  resources: ["validatingwebhookconfigurations"]
  resourceNames: [{{ include "gpupool.admissionConfigurationName" . | quote }}]
  verbs: ["get", "patch"]
{{- end }}
{{- end }}

{{/* The gateway only lists and watches Secrets (those labelled gpupool.dev/kind); it never
reads one by name. */}}
{{- define "gpupool.gatewayNamespacedRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["list", "watch"]
{{- end }}

{{/* The REST API (gpupool.api.backend): it reads Pools; creates Subscriptions, follows one
(watch) until the operator decides, patches cancelAtPeriodEnd and its own annotations, and deletes
one the operator refused; reads key Secrets and management-key Secrets by name (never lists
them). One namespace: always a Role there. */}}
{{- define "gpupool.apiRules" -}}
- apiGroups: ["gpupool.dev"]
  resources: ["pools"]
  verbs: ["get", "list"]
- apiGroups: ["gpupool.dev"]
  resources: ["subscriptions"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
