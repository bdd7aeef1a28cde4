{{/* Names, labels and shared pod pieces of the ISDR chart. */}}

{{- define "isdr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-isdr, or <release> when it already contains the chart name; at most 52 characters
so that every suffix below (-receiver, -operator, -config, ...) keeps names within 63. */}}
{{- define "isdr.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "isdr.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; pass (dict "ctx" $ "component" "receiver"). */}}
{{- define "isdr.labels" -}}
helm.sh/chart: {{ include "isdr.chart" .ctx }}
{{ include "isdr.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: isdr
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end -}}

{{- define "isdr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "isdr.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- define "isdr.receiverName" -}}{{ include "isdr.fullname" . }}-receiver{{- end -}}
{{- define "isdr.operatorName" -}}{{ include "isdr.fullname" . }}-operator{{- end -}}
{{- define "isdr.jobServiceAccountName" -}}{{ include "isdr.fullname" . }}-job{{- end -}}
{{- define "isdr.configName" -}}{{ include "isdr.fullname" . }}-config{{- end -}}
{{- define "isdr.peeringName" -}}{{ default (include "isdr.fullname" .) .Values.operator.peering }}{{- end -}}

{{- define "isdr.claimName" -}}
{{- default (printf "%s-data" (include "isdr.fullname" .)) .Values.storage.pvc.existingClaim -}}
{{- end -}}

{{/* repository:tag, or repository:tag@digest when a digest is given. */}}
{{- define "isdr.image" -}}
{{- $ref := printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- if .Values.image.digest -}}
{{- $ref = printf "%s@%s" $ref .Values.image.digest -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{/* Where the CA bundle is mounted, and CERT_FILE. */}}
{{- define "isdr.caDir" -}}/etc/isdr/ca{{- end -}}
{{- define "isdr.caEnabled" -}}
{{- with .Values.inferenceServer.caBundle -}}{{- if or .configMap .secret -}}true{{- end -}}{{- end -}}
{{- end -}}

{{/* Settings the chart manages itself; `config` must not set them. */}}
{{- define "isdr.managedSettings" -}}
SCP_PORT STORAGE INCOMING_DIR S3_ENDPOINT_URL S3_BUCKET S3_PREFIX S3_REGION CERT_FILE METRICS_PORT HEALTH_PORT
{{- end -}}

{{/* Fails on combinations of values the schema cannot express. */}}
{{- define "isdr.validate" -}}
{{- range $key, $_ := .Values.config -}}
{{- if has $key (splitList " " (include "isdr.managedSettings" $)) -}}
{{- fail (printf "config.%s is set by the chart: use storage.* or inferenceServer.caBundle instead" $key) -}}
{{- end -}}
{{- end -}}
{{- $receiverPorts := list (int .Values.receiver.containerPort) (int .Values.receiver.healthPort) -}}
{{- if .Values.metrics.enabled -}}{{- $receiverPorts = append $receiverPorts (int .Values.metrics.port) -}}{{- end -}}
{{- if .Values.receiver.tls.enabled -}}{{- $receiverPorts = append $receiverPorts (int .Values.receiver.tls.port) -}}{{- end -}}
{{- if ne (len $receiverPorts) (len (uniq $receiverPorts)) -}}
{{- fail "the receiver's ports must differ: receiver.containerPort, receiver.healthPort, metrics.port and receiver.tls.port" -}}
{{- end -}}
{{- if and (eq .Values.storage.type "s3") (not .Values.storage.s3.bucket) -}}
{{- fail "storage.type=s3 needs storage.s3.bucket" -}}
{{- end -}}
{{- with .Values.inferenceServer.caBundle -}}
{{- if and .configMap .secret -}}
{{- fail "inferenceServer.caBundle: give configMap or secret, not both" -}}
{{- end -}}
{{- if and (or .configMap .secret) (not .key) -}}
{{- fail "inferenceServer.caBundle.key is required with a configMap or secret" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Downward-API environment shared by the receiver and the operator. */}}
{{- define "isdr.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}

{{/* envFrom: the relay settings, the S3 credentials in s3 mode, and extraEnvFrom. */}}
{{- define "isdr.envFrom" -}}
- configMapRef:
    name: {{ include "isdr.configName" . }}
{{- if and (eq .Values.storage.type "s3") .Values.storage.s3.credentials.existingSecret }}
- secretRef:
    name: {{ .Values.storage.s3.credentials.existingSecret }}
{{- end }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volume mounts shared by the receiver and the operator. */}}
{{- define "isdr.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if eq .Values.storage.type "pvc" }}
- name: data
  mountPath: /data
{{- end }}
{{- if include "isdr.caEnabled" . }}
- name: ca-bundle
  mountPath: {{ include "isdr.caDir" . }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "isdr.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- if eq .Values.storage.type "pvc" }}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "isdr.claimName" . }}
{{- end }}
{{- with .Values.inferenceServer.caBundle }}
{{- if .configMap }}
- name: ca-bundle
  configMap:
    name: {{ .configMap }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- else if .secret }}
- name: ca-bundle
  secret:
    secretName: {{ .secret }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- with $.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Checksum of the relay settings, so that a changed ConfigMap restarts the pods. */}}
{{- define "isdr.configChecksum" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end -}}

{{/* Whether to leave platform-assigned ids out of security contexts (openshift.adaptSecurityContext). */}}
{{- define "isdr.adaptSecurityContext" -}}
{{- $mode := .Values.openshift.adaptSecurityContext -}}
{{- if or (eq $mode "force") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "security.openshift.io/v1")) -}}
true
{{- end -}}
{{- end -}}

{{/* The pod security context of the receiver, the operator and the Jobs, as a YAML map. */}}
{{- define "isdr.podSecurityContext" -}}
{{- $context := deepCopy .Values.podSecurityContext -}}
{{- if include "isdr.adaptSecurityContext" . -}}
{{- $context = omit $context "runAsUser" "runAsGroup" "fsGroup" -}}
{{- end -}}
{{- toYaml $context -}}
{{- end -}}

{{/* The container security context, as a YAML map. */}}
{{- define "isdr.securityContext" -}}
{{- $context := deepCopy .Values.securityContext -}}
{{- if include "isdr.adaptSecurityContext" . -}}
{{- $context = omit $context "runAsUser" "runAsGroup" -}}
{{- end -}}
{{- toYaml $context -}}
{{- end -}}

{{/* extraEnv, after the chart's own variables. */}}
{{- define "isdr.extraEnv" -}}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end -}}
{{- end -}}


{{/* ISDR's CRDs (templates/crds.yaml) by name, for messages. */}}
{{- define "isdr.crdNames" -}}fingerprints.isdr.io dicomseries.isdr.io{{- end -}}

{{/* Fails, saying what to do, when the CRD `name` exists but this release may not take it over:
it has no Helm owner (it came from the chart's crds/ folder, chart 0.1.0, or kubectl apply), or
another release owns it. Helm would refuse too, without saying how to go on. Pass
(dict "ctx" $ "name" <crd name>). */}}
{{- define "isdr.checkCrdOwner" -}}
{{- $live := lookup "apiextensions.k8s.io/v1" "CustomResourceDefinition" "" .name -}}
{{- if $live -}}
{{- $annotations := $live.metadata.annotations | default dict -}}
{{- $labels := $live.metadata.labels | default dict -}}
{{- $release := index $annotations "meta.helm.sh/release-name" | default "" -}}
{{- $namespace := index $annotations "meta.helm.sh/release-namespace" | default "" -}}
{{- $thisRelease := and (eq $release .ctx.Release.Name) (eq $namespace .ctx.Release.Namespace) -}}
{{- $ours := and $thisRelease (eq (index $labels "app.kubernetes.io/managed-by" | default "") "Helm") -}}
{{- if and $release (not $thisRelease) -}}
{{- fail (printf "the CustomResourceDefinition %s belongs to the release %s in namespace %s: one release manages ISDR's CRDs in a cluster, so install this one with --set crds.enabled=false (docs/kubernetes.md, \"The CRDs\")" .name $release $namespace) -}}
{{- else if not $ours -}}
{{- $names := include "isdr.crdNames" .ctx -}}
{{- fail (printf "the CustomResourceDefinition %s exists but no Helm release manages it (it came from the chart's crds/ folder, as with chart 0.1.0, or from kubectl apply). Let this release take ISDR's CRDs over: `kubectl label crd %s app.kubernetes.io/managed-by=Helm --overwrite` and `kubectl annotate crd %s meta.helm.sh/release-name=%s meta.helm.sh/release-namespace=%s --overwrite`; or keep managing them yourself with --set crds.enabled=false (docs/kubernetes.md, \"The CRDs\")" .name $names $names .ctx.Release.Name .ctx.Release.Namespace) -}}
{{- end -}}
{{- end -}}
{{- end -}}
