// Pieces of an HTTP/1.1 answer: the front end's (and so the floor server's) escaper, status line and socket.
#pragma once
#include <string>
#include <string_view>

namespace aimass::serve::wire {

inline const char* reason(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Content Too Large";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Error";
  }
}

// A JSON string's contents, laid out as the Python serve path writes them: \" \\ \n \r \t \b \f, other
// control characters as \u00XX (lowercase hex). ascii_only false: everything else as it is, non-ASCII
// kept as UTF-8 (orjson's layout, the hot answers). ascii_only true: DEL and every non-ASCII code point
// as \uXXXX, surrogate pairs above U+FFFF (json.dumps with ensure_ascii, the {"error": ...} bodies).
// Bytes that are not well-formed UTF-8, which no Python str holds, become U+FFFD one byte at a time,
// so the body stays valid JSON whatever bytes a request or a model file carried.
void json_escape(std::string& out, std::string_view s, bool ascii_only);

// A non-blocking listening socket on host:port (port 0: any free one, written to bound_port);
// ValueError for a host that is not a numeric address, IOError when it cannot listen. `who`
// names the caller in the messages.
int listen_on(const std::string& host, int port, int backlog, const char* who, int& bound_port);

// Status line, content type and length, extra header lines (each ending in CRLF), the body.
inline void respond(std::string& o, int status, std::string_view ctype, std::string_view extra, std::string_view body,
                    bool keep_alive) {
  o += "HTTP/1.1 ";
  o += std::to_string(status);
  o += ' ';
  o += reason(status);
  o += "\r\ncontent-type: ";
  o += ctype;
  o += "\r\ncontent-length: ";
  o += std::to_string(body.size());
  o += "\r\n";
  o += extra;
  if (!keep_alive) o += "connection: close\r\n";
  o += "\r\n";
  o += body;
}

}  // namespace aimass::serve::wire
