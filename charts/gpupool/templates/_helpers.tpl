{{/* Chart name, bounded to 63 characters. */}}
{{- define "gpupool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: the release name, plus the chart name unless the release contains it. */}}
{{- define "gpupool.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gpupool.operatorName" -}}
{{- printf "%s-operator" (include "gpupool.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gpupool.gatewayName" -}}
{{- printf "%s-gateway" (include "gpupool.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The ValidatingWebhookConfiguration (cluster-scoped): one per release and namespace. */}}
{{- define "gpupool.admissionConfigurationName" -}}
{{- printf "%s-%s.gpupool.dev" (include "gpupool.operatorName" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "gpupool.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on everything the chart makes. */}}
{{- define "gpupool.labels" -}}
helm.sh/chart: {{ include "gpupool.chart" . }}
{{ include "gpupool.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpupool
{{- end }}

{{- define "gpupool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpupool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gpupool.operatorSelectorLabels" -}}
{{ include "gpupool.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "gpupool.gatewaySelectorLabels" -}}
{{ include "gpupool.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "gpupool.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "gpupool.operatorName" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gpupool.gatewayServiceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "gpupool.gatewayName" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gpupool.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Namespaces that get a vLLM NetworkPolicy, as a JSON list. */}}
{{- define "gpupool.networkPolicyNamespaces" -}}
{{- if .Values.networkPolicy.namespaces }}
{{- toJson (uniq .Values.networkPolicy.namespaces) }}
{{- else if .Values.watchNamespaces }}
{{- toJson (uniq .Values.watchNamespaces) }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/*
The value a flag gets in an argument list ("--flag VALUE" or "--flag=VALUE"; the last one wins,
as with argparse), or "" when the flag is absent. Call with (dict "args" LIST "flag" "--flag").
*/}}
{{- define "gpupool.argValue" -}}
{{- $args := .args }}
{{- $out := "" }}
{{- range $i, $a := $args }}
{{- if and (eq $a $.flag) (lt (add1 $i) (len $args)) }}
{{- $out = index $args (add1 $i) }}
{{- else if hasPrefix (printf "%s=" $.flag) $a }}
{{- $out = trimPrefix (printf "%s=" $.flag) $a }}
{{- end }}
{{- end }}
{{- $out }}
{{- end }}

{{/*
Fail the render when a port the Services, probes and ServiceMonitors use is not the port the
process listens on, or when two of a container's ports collide.
*/}}
{{- define "gpupool.checkOperatorPorts" -}}
{{- $op := .Values.operator }}
{{- $opArgs := concat $op.args $op.extraArgs }}
{{- $liveness := include "gpupool.argValue" (dict "args" $opArgs "flag" "--liveness") }}
{{- if not $liveness }}
{{- fail "operator.args/extraArgs must pass --liveness http://0.0.0.0:<operator.ports.health>/healthz: the Deployment's liveness probe calls it" }}
{{- end }}
{{- $port := regexFind "[0-9]+$" (regexFind "^[a-z]+://[^/]*" $liveness) }}
{{- if ne $port (toString $op.ports.health) }}
{{- fail (printf "operator.ports.health (%v) must be the port of the --liveness URL in operator.args (%s): the liveness probe calls that port" $op.ports.health $liveness) }}
{{- end }}
{{- if eq (int $op.ports.health) (int $op.ports.metrics) }}
{{- fail (printf "operator.ports.health and operator.ports.metrics are both %v: use two ports" $op.ports.health) }}
{{- end }}
{{- if and .Values.stripe.existingSecret (has (int $op.ports.webhook) (list (int $op.ports.health) (int $op.ports.metrics))) }}
{{- fail (printf "operator.ports.webhook (%v) collides with operator.ports.health or operator.ports.metrics" $op.ports.webhook) }}
{{- end }}
{{- if .Values.admission.enabled }}
{{- $taken := list (int $op.ports.health) (int $op.ports.metrics) }}
{{- if .Values.stripe.existingSecret }}
{{- $taken = append $taken (int $op.ports.webhook) }}
{{- end }}
{{- if has (int .Values.admission.port) $taken }}
{{- fail (printf "admission.port (%v) collides with operator.ports.health, operator.ports.metrics or (with billing on) operator.ports.webhook" .Values.admission.port) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gpupool.checkGatewayPorts" -}}
{{- $gw := .Values.gateway }}
{{- $gwArgs := concat $gw.args $gw.extraArgs }}
{{- /* The gateway's own defaults when the flags are absent: --port 8080, --metrics-port 9090. */}}
{{- $http := include "gpupool.argValue" (dict "args" $gwArgs "flag" "--port") | default "8080" }}
{{- $metrics := include "gpupool.argValue" (dict "args" $gwArgs "flag" "--metrics-port") | default "9090" }}
{{- if ne $http (toString $gw.ports.http) }}
{{- fail (printf "gateway.ports.http (%v) must equal the gateway's --port (%s) in gateway.args/extraArgs" $gw.ports.http $http) }}
{{- end }}
{{- if ne $metrics (toString $gw.ports.metrics) }}
{{- fail (printf "gateway.ports.metrics (%v) must equal the gateway's --metrics-port (%s) in gateway.args/extraArgs (0, metrics on the main port, is not supported by the chart)" $gw.ports.metrics $metrics) }}
{{- end }}
{{- if eq (int $gw.ports.http) (int $gw.ports.metrics) }}
{{- fail (printf "gateway.ports.http and gateway.ports.metrics are both %v: use two ports" $gw.ports.http) }}
{{- end }}
{{- end }}

{{/* The REST API (api.enabled). */}}
{{- define "gpupool.apiName" -}}
{{- printf "%s-api" (include "gpupool.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gpupool.apiSelectorLabels" -}}
{{ include "gpupool.selectorLabels" . }}
app.kubernetes.io/component: api
{{- end }}

{{- define "gpupool.apiServiceAccountName" -}}
{{- if .Values.api.serviceAccount.create }}
{{- default (include "gpupool.apiName" .) .Values.api.serviceAccount.name }}
{{- else }}
{{- required "api.serviceAccount.name is required when api.serviceAccount.create is false" .Values.api.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespace the API serves: api.namespace, else the first watched one, else the release's. */}}
{{- define "gpupool.apiNamespace" -}}
{{- if .Values.api.namespace }}
{{- .Values.api.namespace }}
{{- else if .Values.watchNamespaces }}
{{- first .Values.watchNamespaces }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/* Fail the render when the API's --port is not api.ports.http, or when it would serve a
namespace the operator does not watch. */}}
{{- define "gpupool.checkApi" -}}
{{- $api := .Values.api }}
{{- $args := concat $api.args $api.extraArgs }}
{{- $http := include "gpupool.argValue" (dict "args" $args "flag" "--port") | default "8000" }}
{{- if ne $http (toString $api.ports.http) }}
{{- fail (printf "api.ports.http (%v) must equal the API's --port (%s) in api.args/extraArgs" $api.ports.http $http) }}
{{- end }}
{{- if include "gpupool.argValue" (dict "args" $args "flag" "--namespace") }}
{{- fail "api.args/extraArgs must not pass --namespace: set api.namespace" }}
{{- end }}
{{- $ns := include "gpupool.apiNamespace" . }}
{{- if and .Values.watchNamespaces (not (has $ns .Values.watchNamespaces)) }}
{{- fail (printf "api.namespace (%s) must be one of watchNamespaces: the operator serves only those" $ns) }}
{{- end }}
{{- end }}
