from db.models.adapters import Adapter
from db.models.batches import Batch, BatchLineError, FilePart
from db.models.files import File
from db.models.jobs import Job, JobMetric, UsageLedger
from db.models.responses import StoredResponse
from db.models.users import ApiKey, Quota, User
from db.models.webhooks import WebhookDelivery

__all__ = [
    "Adapter", "ApiKey", "Batch", "BatchLineError", "File", "FilePart", "Job", "JobMetric", "Quota",
    "StoredResponse", "UsageLedger", "User", "WebhookDelivery",
]  # fmt: skip
