{{/* Prometheus metrics: the port setting, the container port, the metrics Services' names. */}}

{{/* METRICS_PORT for the ConfigMap: the port, or 0 (off). */}}
{{- define "isdr.metricsPortSetting" -}}
{{- if .Values.metrics.enabled -}}{{ .Values.metrics.port }}{{- else -}}0{{- end -}}
{{- end -}}

{{/* The `metrics` entry of a container's ports (nothing when metrics are off). */}}
{{- define "isdr.metricsContainerPort" -}}
{{- if .Values.metrics.enabled -}}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
  protocol: TCP
{{- end -}}
{{- end -}}

{{- define "isdr.receiverMetricsName" -}}{{ include "isdr.fullname" . }}-receiver-metrics{{- end -}}
{{- define "isdr.operatorMetricsName" -}}{{ include "isdr.fullname" . }}-operator-metrics{{- end -}}

{{/* The label that marks the metrics Services (what the ServiceMonitor selects). */}}
{{- define "isdr.metricsServiceLabel" -}}isdr.io/metrics: "true"{{- end -}}

{{/* Fails on metrics values the schema cannot express. */}}
{{- define "isdr.validateMetrics" -}}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.operator.healthPort)) -}}
{{- fail "metrics.port must differ from operator.healthPort" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" -}}
{{- end -}}
{{- end -}}

{{/* For alerts on counters with labels: these appear at their first increment, which increase() cannot
see; the "new" half counts a series younger than the window as all increase. Pass (dict "m" metric
"w" window "by" labels). */}}
{{- define "isdr.newOrIncreased" -}}
sum by ({{ .by }}) (increase({{ .m }}[{{ .w }}])) > 0
or
sum by ({{ .by }}) ({{ .m }} unless {{ .m }} offset {{ .w }}) > 0
{{- end -}}
