{{/*
Names and labels. With the release named "syncer" the objects are named as in
deploy/kubernetes/base: syncer, syncer-config, syncer-metrics, syncer-install.
*/}}
{{- define "syncer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "syncer.fullname" -}}
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

{{- define "syncer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "syncer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "syncer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "syncer.labels" -}}
helm.sh/chart: {{ include "syncer.chart" . }}
{{ include "syncer.selectorLabels" . }}
app.kubernetes.io/part-of: syncer
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "syncer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "syncer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: the existing account's name (serviceAccount.create is false)" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "syncer.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The config, checked once: it must be TOML, and its [worker] shutdown_timeout_s (syncer's
default 30 s) below the grace period, or the kubelet kills a soft stop half-way.
*/}}
{{- define "syncer.config" -}}
{{- $config := fromToml .Values.config }}
{{- if hasKey $config "Error" }}
{{- fail (printf "config: not valid TOML: %s" $config.Error) }}
{{- end }}
{{- $worker := get $config "worker" | default dict }}
{{- $shutdown := get $worker "shutdown_timeout_s" | default 30 | float64 }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $shutdown }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be above the config's [worker] shutdown_timeout_s (%v)" .Values.terminationGracePeriodSeconds $shutdown) }}
{{- end }}
{{- .Values.config }}
{{- end }}

{{/* The pods' and the install Job's container settings that are the same for both. */}}
{{- define "syncer.containerCommon" -}}
image: {{ include "syncer.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
# A fatal start-up error (bad config, unset key variable) is one log line: show it in
# `kubectl describe pod` as well as in `kubectl logs --previous`.
terminationMessagePolicy: FallbackToLogsOnError
{{- end }}

{{- define "syncer.podCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
