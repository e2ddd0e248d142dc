"""The contract of worktree-orchestrator: what goes in, what comes out, and how it is hashed.

Importable alone (it depends on pydantic only), so that anyone can read a plan, build an
envelope or re-check a report's digests without the engine.
"""

from ._audit import ENVELOPE_RECORDS as ENVELOPE_RECORDS
from ._audit import MAX_ENVELOPE_BYTES as MAX_ENVELOPE_BYTES
from ._audit import MAX_LOG_BYTES as MAX_LOG_BYTES
from ._audit import MAX_REPORT_BYTES as MAX_REPORT_BYTES
from ._audit import Finding as Finding
from ._audit import NotAReport as NotAReport
from ._audit import audit_report as audit_report
from ._audit import load_report_file as load_report_file
from ._audit import load_report_json as load_report_json
from ._audit import read_logged as read_logged
from ._audit import report_chunks as report_chunks
from ._audit import report_layout as report_layout
from ._audit import upstream_tasks as upstream_tasks
from ._bounded import MAX_VALUE_DEPTH as MAX_VALUE_DEPTH
from ._bounded import hash_file as hash_file
from ._bounded import loads_bounded as loads_bounded
from ._bounded import open_regular as open_regular
from ._bounded import read_bounded as read_bounded
from ._bounded import read_span as read_span
from ._bounded import relative_path_problem as relative_path_problem
from ._bounded import unique_keys as unique_keys
from ._canonical import canonical_json as canonical_json
from ._canonical import digest as digest
from ._canonical import digest_without as digest_without
from ._canonical import json_line as json_line
from ._canonical import sha256_hex as sha256_hex
from ._envelope import ENVELOPE_SCHEMA as ENVELOPE_SCHEMA
from ._envelope import MAX_CHANGED_FILES as MAX_CHANGED_FILES
from ._envelope import HandoffEnvelope as HandoffEnvelope
from ._envelope import Upstream as Upstream
from ._envelope import build_envelope as build_envelope
from ._events import AttemptFailed as AttemptFailed
from ._events import Event as Event
from ._events import GroupDecided as GroupDecided
from ._events import MergeFinished as MergeFinished
from ._events import MergePredicted as MergePredicted
from ._events import Notification as Notification
from ._events import RunFinished as RunFinished
from ._events import RunStarted as RunStarted
from ._events import TaskFinished as TaskFinished
from ._events import TaskPhase as TaskPhase
from ._events import TaskQueued as TaskQueued
from ._events import TaskRetrying as TaskRetrying
from ._events import TaskSkipped as TaskSkipped
from ._events import TaskStarted as TaskStarted
from ._ids import MATRIX_VALUE_PATTERN as MATRIX_VALUE_PATTERN
from ._ids import TASK_ID_PATTERN as TASK_ID_PATTERN
from ._ids import is_object_id as is_object_id
from ._ids import new_run_id as new_run_id
from ._ids import new_task_id as new_task_id
from ._ids import ref_safe as ref_safe
from ._ids import run_id_problem as run_id_problem
from ._ids import task_id_problem as task_id_problem
from ._plan import DEFAULT_ACP_ALLOW as DEFAULT_ACP_ALLOW
from ._plan import DEFAULT_HOOK_TIMEOUT_S as DEFAULT_HOOK_TIMEOUT_S
from ._plan import DEFAULT_STEP_TIMEOUT_S as DEFAULT_STEP_TIMEOUT_S
from ._plan import DEFAULT_TIMEOUT_S as DEFAULT_TIMEOUT_S
from ._plan import ENV_FORMS as ENV_FORMS
from ._plan import HEADER_VARIABLE as HEADER_VARIABLE
from ._plan import MATRIX_FIELDS as MATRIX_FIELDS
from ._plan import MAX_CONCURRENCY as MAX_CONCURRENCY
from ._plan import PLACEHOLDERS as PLACEHOLDERS
from ._plan import AcpSpec as AcpSpec
from ._plan import AgentSpec as AgentSpec
from ._plan import Budget as Budget
from ._plan import Concurrency as Concurrency
from ._plan import CopyPath as CopyPath
from ._plan import EnvSpec as EnvSpec
from ._plan import ExecutorSpec as ExecutorSpec
from ._plan import ExpandedTask as ExpandedTask
from ._plan import Hooks as Hooks
from ._plan import HttpSpec as HttpSpec
from ._plan import KeepWorktrees as KeepWorktrees
from ._plan import Limits as Limits
from ._plan import MergeSpec as MergeSpec
from ._plan import NotifyEvent as NotifyEvent
from ._plan import NotifySpec as NotifySpec
from ._plan import Plan as Plan
from ._plan import PlanDefaults as PlanDefaults
from ._plan import PlanProblem as PlanProblem
from ._plan import Ports as Ports
from ._plan import Rates as Rates
from ._plan import Resources as Resources
from ._plan import Sandbox as Sandbox
from ._plan import Select as Select
from ._plan import Sparse as Sparse
from ._plan import SparsePath as SparsePath
from ._plan import Step as Step
from ._plan import TaskSpec as TaskSpec
from ._plan import ToolKind as ToolKind
from ._plan import VenvOptions as VenvOptions
from ._plan import dependency_cycles as dependency_cycles
from ._plan import env_values as env_values
from ._plan import expand_tasks as expand_tasks
from ._plan import fill_placeholders as fill_placeholders
from ._plan import placeholder_problem as placeholder_problem
from ._plan import plan_problems as plan_problems
from ._plan import validation_message as validation_message
from ._result import NOT_RETRIED as NOT_RETRIED
from ._result import REPORT_SCHEMA as REPORT_SCHEMA
from ._result import REPORT_SCHEMA_V1 as REPORT_SCHEMA_V1
from ._result import REPORT_SCHEMAS as REPORT_SCHEMAS
from ._result import SUCCESSFUL as SUCCESSFUL
from ._result import AgentInfo as AgentInfo
from ._result import AgentSummary as AgentSummary
from ._result import Attempt as Attempt
from ._result import CachedFrom as CachedFrom
from ._result import CheckResult as CheckResult
from ._result import CopiedFile as CopiedFile
from ._result import Environment as Environment
from ._result import ErrorInfo as ErrorInfo
from ._result import ErrorKind as ErrorKind
from ._result import GroupMember as GroupMember
from ._result import GroupReport as GroupReport
from ._result import InputFile as InputFile
from ._result import LeftOutTask as LeftOutTask
from ._result import LogFile as LogFile
from ._result import MergeCheck as MergeCheck
from ._result import MergeConflict as MergeConflict
from ._result import MergedTask as MergedTask
from ._result import MergeRecord as MergeRecord
from ._result import MergeStatus as MergeStatus
from ._result import Metrics as Metrics
from ._result import PhaseSpan as PhaseSpan
from ._result import Provenance as Provenance
from ._result import Report as Report
from ._result import ReportError as ReportError
from ._result import SealedResults as SealedResults
from ._result import Summary as Summary
from ._result import TaskResult as TaskResult
from ._result import TaskStatus as TaskStatus
from ._result import Timings as Timings
from ._result import checks_trailer as checks_trailer
from ._result import report_digest as report_digest
from ._result import seal_report as seal_report
from ._result import seal_result as seal_result
from ._result import sealed_result_line as sealed_result_line
from ._schema import json_schemas as json_schemas
from ._secrets import MASK as MASK
from ._secrets import is_secret_name as is_secret_name
from ._secrets import masked_env as masked_env
from ._secrets import masked_plan as masked_plan
from ._secrets import masked_task as masked_task
from ._usage import CostSource as CostSource
from ._usage import Usage as Usage
from ._usage import UsageTotals as UsageTotals
from ._usage import add_usage as add_usage
from ._usage import estimate_cost as estimate_cost
from ._usage import usage_by_model as usage_by_model
from ._usage import usage_totals as usage_totals
from ._usage import with_estimated_cost as with_estimated_cost

__all__ = [
    "DEFAULT_ACP_ALLOW",
    "DEFAULT_HOOK_TIMEOUT_S",
    "DEFAULT_STEP_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "ENVELOPE_RECORDS",
    "ENVELOPE_SCHEMA",
    "ENV_FORMS",
    "HEADER_VARIABLE",
    "MASK",
    "MATRIX_FIELDS",
    "MATRIX_VALUE_PATTERN",
    "MAX_CHANGED_FILES",
    "MAX_CONCURRENCY",
    "MAX_ENVELOPE_BYTES",
    "MAX_LOG_BYTES",
    "MAX_REPORT_BYTES",
    "MAX_VALUE_DEPTH",
    "NOT_RETRIED",
    "PLACEHOLDERS",
    "REPORT_SCHEMA",
    "REPORT_SCHEMAS",
    "REPORT_SCHEMA_V1",
    "SUCCESSFUL",
    "TASK_ID_PATTERN",
    "AcpSpec",
    "AgentInfo",
    "AgentSpec",
    "AgentSummary",
    "Attempt",
    "AttemptFailed",
    "Budget",
    "CachedFrom",
    "CheckResult",
    "Concurrency",
    "CopiedFile",
    "CopyPath",
    "CostSource",
    "EnvSpec",
    "Environment",
    "ErrorInfo",
    "ErrorKind",
    "Event",
    "ExecutorSpec",
    "ExpandedTask",
    "Finding",
    "GroupDecided",
    "GroupMember",
    "GroupReport",
    "HandoffEnvelope",
    "Hooks",
    "HttpSpec",
    "InputFile",
    "KeepWorktrees",
    "LeftOutTask",
    "Limits",
    "LogFile",
    "MergeCheck",
    "MergeConflict",
    "MergeFinished",
    "MergePredicted",
    "MergeRecord",
    "MergeSpec",
    "MergeStatus",
    "MergedTask",
    "Metrics",
    "NotAReport",
    "Notification",
    "NotifyEvent",
    "NotifySpec",
    "PhaseSpan",
    "Plan",
    "PlanDefaults",
    "PlanProblem",
    "Ports",
    "Provenance",
    "Rates",
    "Report",
    "ReportError",
    "Resources",
    "RunFinished",
    "RunStarted",
    "Sandbox",
    "SealedResults",
    "Select",
    "Sparse",
    "SparsePath",
    "Step",
    "Summary",
    "TaskFinished",
    "TaskPhase",
    "TaskQueued",
    "TaskResult",
    "TaskRetrying",
    "TaskSkipped",
    "TaskSpec",
    "TaskStarted",
    "TaskStatus",
    "Timings",
    "ToolKind",
    "Upstream",
    "Usage",
    "UsageTotals",
    "VenvOptions",
    "add_usage",
    "audit_report",
    "build_envelope",
    "canonical_json",
    "checks_trailer",
    "dependency_cycles",
    "digest",
    "digest_without",
    "env_values",
    "estimate_cost",
    "expand_tasks",
    "fill_placeholders",
    "hash_file",
    "is_object_id",
    "is_secret_name",
    "json_line",
    "json_schemas",
    "load_report_file",
    "load_report_json",
    "loads_bounded",
    "masked_env",
    "masked_plan",
    "masked_task",
    "new_run_id",
    "new_task_id",
    "open_regular",
    "placeholder_problem",
    "plan_problems",
    "read_bounded",
    "read_logged",
    "read_span",
    "ref_safe",
    "relative_path_problem",
    "report_chunks",
    "report_digest",
    "report_layout",
    "run_id_problem",
    "seal_report",
    "seal_result",
    "sealed_result_line",
    "sha256_hex",
    "task_id_problem",
    "unique_keys",
    "upstream_tasks",
    "usage_by_model",
    "usage_totals",
    "validation_message",
    "with_estimated_cost",
]
