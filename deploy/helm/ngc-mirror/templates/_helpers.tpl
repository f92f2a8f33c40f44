{{/* Name of the release's objects: the release name, or ngc-mirror in it. */}}
{{- define "ngc-mirror.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select one component's pods: (dict "ctx" $ "component" "mirror"). */}}
{{- define "ngc-mirror.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every object's labels. */}}
{{- define "ngc-mirror.labels" -}}
{{ include "ngc-mirror.selector" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
{{- end -}}

{{/* The mirror's Redis URL when it is not a secret. */}}
{{- define "ngc-mirror.redisURL" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "ngc-mirror.fullname" . }}-redis:6379/0
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* The S3 endpoint: the bundled MinIO, or the configured one. */}}
{{- define "ngc-mirror.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
http://{{ include "ngc-mirror.fullname" . }}-minio:9000
{{- else -}}
{{- .Values.s3.endpoint -}}
{{- end -}}
{{- end -}}

{{/* Fails on values that cannot make a working cluster. */}}
{{- define "ngc-mirror.validate" -}}
{{- if lt (int .Values.replicas) 1 -}}{{ fail "replicas: at least 1" }}{{- end -}}
{{- if not .Values.cluster.secretName -}}{{ fail "cluster.secretName: a Secret with the peer secret is required (kubectl create secret generic ngc-mirror-cluster --from-literal=secret=...)" }}{{- end -}}
{{- if not .Values.s3.bucket -}}{{ fail "s3.bucket is required: the replicas share one cache bucket" }}{{- end -}}
{{- if and .Values.minio.enabled (not .Values.s3.credentialsSecret) -}}{{ fail "minio.enabled needs s3.credentialsSecret (keys access-key, secret-key): MinIO's root credentials" }}{{- end -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.url) (not .Values.redis.urlSecret) -}}{{ fail "redis.enabled=false needs redis.url or redis.urlSecret: membership and leases live in Redis" }}{{- end -}}
{{- if and .Values.containerdHosts.enabled (ne .Values.service.type "NodePort") -}}{{ fail "containerdHosts.enabled needs service.type NodePort (the nodes reach the mirror on the node port)" }}{{- end -}}
{{- if eq (int .Values.cluster.port) (int .Values.service.port) -}}{{ fail "cluster.port must differ from service.port" }}{{- end -}}
{{- if not (has .Values.antiAffinity (list "soft" "hard")) -}}{{ fail "antiAffinity: soft or hard" }}{{- end -}}
{{- range $k := list "storage" "state" "cluster" "addr" -}}
{{- if hasKey $.Values.config $k -}}{{ fail (printf "config.%s is set by the chart (see values.yaml), not in config" $k) }}{{- end -}}
{{- end -}}
{{- end -}}
