'use strict';
// The contract's error codes (API.md §1).

const STATUS = {
  validation_failed: 400,
  unauthorized: 401,
  invalid_credentials: 401,
  forbidden: 403,
  not_found: 404,
  conflict: 409,
  payload_too_large: 413,
  rate_limited: 429,
  unavailable: 503,
  internal: 500,
};

class ApiError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
    this.status = STATUS[code] || 500;
  }
  toJSON() {
    return { code: this.code, message: this.message };
  }
}

/** Any thrown value as an ApiError (unexpected ones become `internal`). */
function asApiError(e, log) {
  if (e instanceof ApiError) return e;
  if (log) log(`internal error: ${e && e.stack ? e.stack : e}`);
  return new ApiError('internal', 'internal error');
}

module.exports = { ApiError, asApiError };
