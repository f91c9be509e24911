// HTTP/1.1 request parser (RFC 9112) for the native front end: strict where leniency would
// let a request mean two things (duplicate or non-numeric Content-Length, Transfer-Encoding
// beside it, whitespace before a header's colon, obsolete line folding), tolerant of bare LF
// line ends, and bounded: the head and the body have limits checked before they are buffered.
#include <cstring>

#include "aimass/serve.h"

namespace aimass::serve {
namespace {

bool ieq(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    char x = a[i], y = b[i];
    if (x >= 'A' && x <= 'Z') x = static_cast<char>(x - 'A' + 'a');
    if (y >= 'A' && y <= 'Z') y = static_cast<char>(y - 'A' + 'a');
    if (x != y) return false;
  }
  return true;
}

// RFC 9110 tchar
bool is_tchar(unsigned char c) {
  if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return true;
  return std::strchr("!#$%&'*+-.^_`|~", c) != nullptr && c != 0;
}

ParseResult fail(int status, std::string msg) {
  ParseResult r;
  r.status = ParseStatus::Error;
  r.http_status = status;
  r.error = std::move(msg);
  return r;
}

// The end of the head (index just past the empty line) or npos; accepts CRLF and bare LF.
size_t head_end(const char* d, size_t len) {
  for (size_t i = 0; i + 1 < len; ++i) {
    if (d[i] != '\n') continue;
    if (d[i + 1] == '\n') return i + 2;
    if (d[i + 1] == '\r' && i + 2 < len && d[i + 2] == '\n') return i + 3;
  }
  return std::string_view::npos;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

bool has_token(std::string_view list, std::string_view tok) {  // "close", "keep-alive" in a Connection list
  while (!list.empty()) {
    size_t c = list.find(',');
    if (ieq(trim(list.substr(0, c)), tok)) return true;
    if (c == std::string_view::npos) break;
    list.remove_prefix(c + 1);
  }
  return false;
}

}  // namespace

std::string_view HttpRequest::header(std::string_view name) const {
  for (const auto& h : headers)
    if (ieq(h.name, name)) return h.value;
  return {};
}

bool HttpRequest::has_header(std::string_view name) const {
  for (const auto& h : headers)
    if (ieq(h.name, name)) return true;
  return false;
}

size_t request_head_length(const char* data, size_t len) {
  size_t skip = 0;
  while (skip < len && (data[skip] == '\r' || data[skip] == '\n') && skip < 4) ++skip;
  size_t end = head_end(data + skip, len - skip);
  return end == std::string_view::npos ? 0 : skip + end;
}

ParseResult parse_request(const char* data, size_t len, const HttpLimits& limits, HttpRequest& out) {
  // RFC 9112 2.2: ignore empty lines before the request line (left over after a previous body)
  size_t skip = 0;
  while (skip < len && (data[skip] == '\r' || data[skip] == '\n') && skip < 4) ++skip;
  const char* d = data + skip;
  size_t n = len - skip;
  size_t end = head_end(d, std::min(n, limits.max_header_bytes + 4));
  if (end == std::string_view::npos) {
    if (n > limits.max_header_bytes)
      return fail(431, "request head is over " + std::to_string(limits.max_header_bytes) + " bytes");
    // an early look at the request line, so that garbage is refused before a whole head arrives
    for (size_t i = 0; i < n && d[i] != '\n'; ++i) {
      unsigned char c = static_cast<unsigned char>(d[i]);
      if (c < 0x20 && c != '\r' && c != '\t') return fail(400, "control character in the request line");
    }
    return {};
  }
  out = HttpRequest{};
  std::string_view head(d, end);
  // request line: method SP target SP HTTP/1.x
  size_t eol = head.find('\n');
  std::string_view line = head.substr(0, eol);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  size_t s1 = line.find(' ');
  size_t s2 = s1 == std::string_view::npos ? s1 : line.find(' ', s1 + 1);
  if (s1 == std::string_view::npos || s2 == std::string_view::npos || line.find(' ', s2 + 1) != std::string_view::npos)
    return fail(400, "malformed request line (want: METHOD /path HTTP/1.1)");
  out.method = line.substr(0, s1);
  out.target = line.substr(s1 + 1, s2 - s1 - 1);
  std::string_view version = line.substr(s2 + 1);
  if (out.method.empty()) return fail(400, "empty method");
  for (unsigned char c : out.method)
    if (!is_tchar(c)) return fail(400, "malformed method");
  if (out.target.empty() || (out.target[0] != '/' && out.target != "*"))
    return fail(400, "request target must be an absolute path");
  for (unsigned char c : out.target)
    if (c <= 0x20 || c == 0x7f) return fail(400, "control character or space in the request target");
  if (version.size() != 8 || version.substr(0, 5) != "HTTP/" || version[6] != '.' || version[5] < '0' ||
      version[5] > '9' || version[7] < '0' || version[7] > '9')
    return fail(400, "malformed HTTP version");
  if (version[5] != '1') return fail(505, "only HTTP/1.0 and HTTP/1.1 are served");
  out.minor_version = version[7] - '0';
  out.keep_alive = out.minor_version >= 1;
  // headers
  int64_t content_length = -1;
  std::string_view rest = head.substr(eol + 1);
  while (!rest.empty()) {
    size_t e = rest.find('\n');
    std::string_view h = rest.substr(0, e);
    rest.remove_prefix(e == std::string_view::npos ? rest.size() : e + 1);
    if (!h.empty() && h.back() == '\r') h.remove_suffix(1);
    if (h.empty()) break;  // the empty line that ends the head
    if (h[0] == ' ' || h[0] == '\t') return fail(400, "obsolete header line folding is not accepted");
    size_t colon = h.find(':');
    if (colon == std::string_view::npos || colon == 0) return fail(400, "malformed header line (no 'name:')");
    std::string_view name = h.substr(0, colon);
    for (unsigned char c : name)
      if (!is_tchar(c)) return fail(400, "malformed header name");
    std::string_view value = trim(h.substr(colon + 1));
    for (unsigned char c : value)
      if ((c < 0x20 && c != '\t') || c == 0x7f) return fail(400, "control character in a header value");
    if (out.headers.size() >= limits.max_headers)
      return fail(431, "more than " + std::to_string(limits.max_headers) + " header lines");
    out.headers.push_back({name, value});
    if (ieq(name, "content-length")) {
      if (value.empty() || value.size() > 18) return fail(400, "malformed Content-Length");
      int64_t v = 0;
      for (char c : value) {
        if (c < '0' || c > '9') return fail(400, "malformed Content-Length");
        v = v * 10 + (c - '0');
      }
      if (content_length >= 0 && content_length != v) return fail(400, "conflicting Content-Length headers");
      content_length = v;
    } else if (ieq(name, "transfer-encoding")) {
      return fail(501, "Transfer-Encoding is not supported here; send the body with Content-Length");
    } else if (ieq(name, "connection")) {
      if (has_token(value, "close")) out.keep_alive = false;
      else if (has_token(value, "keep-alive")) out.keep_alive = true;
    }
  }
  if (content_length > limits.max_body_bytes)
    return fail(413, "request body of " + std::to_string(content_length) + " bytes is over the server's limit of " +
                         std::to_string(limits.max_body_bytes) + " bytes");
  size_t body_len = content_length < 0 ? 0 : static_cast<size_t>(content_length);
  if (n - end < body_len) return {};  // the body is still arriving
  out.body = std::string_view(d + end, body_len);
  out.consumed = skip + end + body_len;
  ParseResult ok;
  ok.status = ParseStatus::Ok;
  return ok;
}

}  // namespace aimass::serve
