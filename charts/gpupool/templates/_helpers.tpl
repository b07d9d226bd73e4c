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
