{{/* Names, labels and the shared pieces of the pod specs. */}}

{{/* The chart's name. */}}
{{- define "mikrom.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's prefix of every name: "<release>-mikrom" (or the release alone when it already
contains the chart's name), at most 63 characters less room for a component suffix. */}}
{{- define "mikrom.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<name>-<version>" for the helm.sh/chart label. */}}
{{- define "mikrom.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels every resource carries. */}}
{{- define "mikrom.labels" -}}
helm.sh/chart: {{ include "mikrom.chart" . }}
{{ include "mikrom.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mikrom
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The labels selectors match on. */}}
{{- define "mikrom.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mikrom.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component's resources: (dict "ctx" $ "component" "operator"). */}}
{{- define "mikrom.componentLabels" -}}
{{ include "mikrom.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator"). */}}
{{- define "mikrom.componentSelectorLabels" -}}
{{ include "mikrom.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An image reference "repository:tag[@digest]": (dict "image" .Values.images.operator "ctx" $). */}}
{{- define "mikrom.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "mikrom.operator.serviceAccountName" -}}
{{- default (printf "%s-operator" (include "mikrom.fullname" .)) .Values.serviceAccount.operatorName }}
{{- end }}

{{- define "mikrom.worker.serviceAccountName" -}}
{{- default (printf "%s-worker" (include "mikrom.fullname" .)) .Values.serviceAccount.workerName }}
{{- end }}

{{/* A Secret's existing value under `key`, or "" (a first install, or `helm template`). Generated
passwords are kept across upgrades this way: (dict "ctx" $ "name" NAME "key" KEY). */}}
{{- define "mikrom.existingSecretValue" -}}
{{- $secret := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $secret $secret.data (hasKey $secret.data .key) }}
{{- index $secret.data .key | b64dec }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- Redis and the broker */}}

{{- define "mikrom.redis.fullname" -}}
{{- printf "%s-redis" (include "mikrom.fullname" .) }}
{{- end }}

{{- define "mikrom.redis.replicas" -}}
{{- if .Values.redis.sentinel.enabled }}{{ .Values.redis.sentinel.replicas }}{{ else }}1{{ end }}
{{- end }}

{{/* The Secret and key holding the broker's password. */}}
{{- define "mikrom.redis.secretName" -}}
{{- if .Values.redis.enabled }}
{{- default (include "mikrom.redis.fullname" .) .Values.redis.auth.existingSecret }}
{{- else }}
{{- default (printf "%s-external-redis" (include "mikrom.fullname" .)) .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{- define "mikrom.redis.secretKey" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretPasswordKey }}{{ else }}redis-password{{ end }}
{{- else }}
{{- if .Values.externalRedis.existingSecret }}{{ .Values.externalRedis.existingSecretPasswordKey }}{{ else }}redis-password{{ end }}
{{- end }}
{{- end }}

{{/* DNS name of the in-chart Redis pod `i`, through the headless Service. */}}
{{- define "mikrom.redis.podHost" -}}
{{- $name := include "mikrom.redis.fullname" .ctx }}
{{- printf "%s-%d.%s-headless.%s.svc.%s" $name (int .i) $name .ctx.Release.Namespace .ctx.Values.clusterDomain }}
{{- end }}

{{/* The broker URL, without its password (MIKROM_REDIS_PASSWORD adds it). */}}
{{- define "mikrom.brokerUrl" -}}
{{- if not .Values.redis.enabled }}
{{- required "externalRedis.url is required when redis.enabled is false" .Values.externalRedis.url }}
{{- else if .Values.redis.sentinel.enabled }}
{{- $urls := list }}
{{- range $i, $_ := until (int .Values.redis.sentinel.replicas) }}
{{- $urls = append $urls (printf "sentinel://%s:26379" (include "mikrom.redis.podHost" (dict "ctx" $ "i" $i))) }}
{{- end }}
{{- printf "%s/%d" (join ";" $urls) (int .Values.redis.database) }}
{{- else }}
{{- printf "redis://%s.%s.svc.%s:6379/%d" (include "mikrom.redis.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.redis.database) }}
{{- end }}
{{- end }}

{{/* What every component needs to reach the broker: URL, password (from the Secret) and, for
Sentinel, the master's name. No password ever appears in a command line. */}}
{{- define "mikrom.brokerEnv" -}}
- name: MIKROM_BROKER_URL
  value: {{ include "mikrom.brokerUrl" . | quote }}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.resultBackendUrl }}
- name: MIKROM_RESULT_BACKEND
  value: {{ .Values.externalRedis.resultBackendUrl | quote }}
{{- end }}
- name: MIKROM_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "mikrom.redis.secretName" . }}
      key: {{ include "mikrom.redis.secretKey" . }}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.sentinel.enabled }}
- name: MIKROM_BROKER_SENTINEL_MASTER
  value: {{ .Values.redis.sentinel.masterName | quote }}
{{- end }}
{{- else if hasPrefix "sentinel://" .Values.externalRedis.url }}
- name: MIKROM_BROKER_SENTINEL_MASTER
  value: {{ .Values.externalRedis.sentinelMasterName | quote }}
{{- end }}
{{- end }}

{{/* Settings every Mikrom component shares: the broker, the task limits, `settings`. */}}
{{- define "mikrom.commonEnv" -}}
{{ include "mikrom.brokerEnv" . }}
- name: MIKROM_TASK_TIME_LIMIT
  value: {{ .Values.taskTimeLimit | quote }}
- name: MIKROM_TASK_SOFT_TIME_LIMIT
  value: {{ .Values.taskSoftTimeLimit | quote }}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- range $name, $value := .Values.settings }}
- name: {{ printf "MIKROM_%s" (upper $name) }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Extra environment variables (name: value) of one component. */}}
{{- define "mikrom.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Prometheus scrape annotations. */}}
{{- define "mikrom.metricsAnnotations" -}}
{{- if .Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* Flower's path prefix as "/<prefix>" ("" at the root). */}}
{{- define "mikrom.flower.prefix" -}}
{{- with trimAll "/" .Values.flower.urlPrefix }}/{{ . }}{{ end }}
{{- end }}

{{/* Checks of combinations the schema cannot express. */}}
{{- define "mikrom.validate" -}}
{{- if le (int .Values.worker.terminationGracePeriodSeconds) (int .Values.taskTimeLimit) }}
{{- fail (printf "worker.terminationGracePeriodSeconds (%v) must be above taskTimeLimit (%v): a task cut off by the kill would be redelivered only after Redis' visibility timeout" .Values.worker.terminationGracePeriodSeconds .Values.taskTimeLimit) }}
{{- end }}
{{- if ge (int .Values.taskSoftTimeLimit) (int .Values.taskTimeLimit) }}
{{- fail (printf "taskSoftTimeLimit (%v) must be below taskTimeLimit (%v)" .Values.taskSoftTimeLimit .Values.taskTimeLimit) }}
{{- end }}
{{- range $name, $dir := dict "worker.stateDir" .Values.worker.stateDir "worker.imageDir" .Values.worker.imageDir "worker.jailer.chrootBase" .Values.worker.jailer.chrootBase }}
{{- if or (eq (trimSuffix "/" $dir) "/tmp") (hasPrefix "/tmp/" $dir) }}
{{- fail (printf "%s (%s) must not be under /tmp: the worker's /tmp is an emptyDir that goes with its pod, and the VMs' supervisors would lose their state directory with it" $name $dir) }}
{{- end }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not .Values.externalRedis.url) }}
{{- fail "externalRedis.url is required when redis.enabled is false" }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not .Values.externalRedis.existingSecret) (not .Values.externalRedis.password) }}
{{- fail "externalRedis.existingSecret (or externalRedis.password) is required: Mikrom refuses a broker without a password" }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.sentinel.enabled (lt (int .Values.redis.sentinel.replicas) (int .Values.redis.sentinel.quorum)) }}
{{- fail (printf "redis.sentinel.quorum (%v) cannot exceed redis.sentinel.replicas (%v)" .Values.redis.sentinel.quorum .Values.redis.sentinel.replicas) }}
{{- end }}
{{- if and (not .Values.serviceAccount.create) .Values.rbac.create (or (not .Values.serviceAccount.operatorName) (not .Values.serviceAccount.workerName)) }}
{{- fail "serviceAccount.operatorName and serviceAccount.workerName are required when serviceAccount.create is false" }}
{{- end }}
{{- end }}
