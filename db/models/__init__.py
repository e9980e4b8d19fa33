from db.models.files import File
from db.models.jobs import Job, JobMetric, UsageLedger
from db.models.users import ApiKey, Quota, User

__all__ = ["ApiKey", "File", "Job", "JobMetric", "Quota", "UsageLedger", "User"]
