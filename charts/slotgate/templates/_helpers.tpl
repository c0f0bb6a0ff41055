{{/* Name of the chart, or nameOverride. */}}
{{- define "slotgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: the release name, with the chart name unless it holds it. */}}
{{- define "slotgate.fullname" -}}
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

{{/* Labels every object carries. */}}
{{- define "slotgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "slotgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: slotgate
{{- end }}

{{/* Selector labels of one component: call with (list . "gateway"). */}}
{{- define "slotgate.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "slotgate.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Name of the configuration the controller writes and the gateways read. */}}
{{- define "slotgate.configName" -}}
{{- printf "%s-config" (include "slotgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* ServiceAccount of one component: call with (list . "gateway"). */}}
{{- define "slotgate.serviceAccount" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $sa := (index $root.Values $component).serviceAccount -}}
{{- if $sa.create }}
{{- default (printf "%s-%s" (include "slotgate.fullname" $root) $component) $sa.name }}
{{- else }}
{{- default "default" $sa.name }}
{{- end }}
{{- end }}

{{- define "slotgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The upstream URL the gateways forward to: the value, or the demo upstream's Service. */}}
{{- define "slotgate.upstream" -}}
{{- if .Values.gateway.upstream }}
{{- .Values.gateway.upstream }}
{{- else }}
{{- printf "http://%s-demo-upstream.%s.svc:%d" (include "slotgate.fullname" .) .Release.Namespace (int .Values.demo.port) }}
{{- end }}
{{- end }}

{{/* Whether the gateways share limits through Redis. */}}
{{- define "slotgate.shared" -}}
{{- if or .Values.state.url .Values.state.existingSecret.name }}true{{ end }}
{{- end }}

{{/* Environment every slotgate container gets: its pod's identity and the log settings. */}}
{{- define "slotgate.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: SLOTGATE_LOG
  value: {{ .Values.logging.envFilter | quote }}
- name: SLOTGATE_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
{{- end }}

{{/* Spread replicas of a component over nodes when the user gave no affinity. */}}
{{- define "slotgate.affinity" -}}
{{- $root := index . 0 -}}
{{- $affinity := index . 2 -}}
{{- if $affinity }}
{{- toYaml $affinity }}
{{- else }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "slotgate.selectorLabels" (list $root (index . 1)) | nindent 12 }}
{{- end }}
{{- end }}

{{/* Refuse settings that would enforce the wrong limits. */}}
{{- define "slotgate.validate" -}}
{{- if and (not (include "slotgate.shared" .)) (or (gt (int .Values.gateway.replicas) 1) .Values.gateway.autoscaling.enabled) }}
{{- fail "gateway.replicas > 1 and gateway.autoscaling.enabled need state.url or state.existingSecret.name (Redis): without shared state every gateway replica would enforce a whole plan limit on its own" }}
{{- end }}
{{- if and .Values.tasks.enabled (eq .Values.tasks.store "embedded") (or (gt (int .Values.gateway.replicas) 1) .Values.gateway.autoscaling.enabled) }}
{{- fail "tasks.enabled with tasks.store: embedded needs gateway.replicas: 1 without gateway.autoscaling: the tasks live on one PersistentVolumeClaim, which one gateway pod at a time can open; for several replicas set tasks.store: redis (with state.url)" }}
{{- end }}
{{- if and .Values.tasks.enabled (eq .Values.tasks.store "redis") (not (include "slotgate.shared" .)) }}
{{- fail "tasks.store: redis keeps the tasks in the gateways' shared Redis: set state.url or state.existingSecret.name" }}
{{- end }}
{{- if and .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas)) }}
{{- fail "gateway.autoscaling.minReplicas must not exceed gateway.autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

{{/* Whole seconds of a duration value like 250ms, 30s or 2m (rounded up). */}}
{{- define "slotgate.seconds" -}}
{{- $v := toString . -}}
{{- if hasSuffix "ms" $v -}}
{{- div (add (trimSuffix "ms" $v | float64 | int) 999) 1000 -}}
{{- else if hasSuffix "m" $v -}}
{{- mul (trimSuffix "m" $v | float64 | int) 60 -}}
{{- else -}}
{{- trimSuffix "s" $v | float64 | ceil | int -}}
{{- end -}}
{{- end }}
