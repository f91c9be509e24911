// Pieces of an HTTP/1.1 answer shared by the floor server and the front end.
#pragma once
#include <cstdio>
#include <string>
#include <string_view>

namespace aimass::serve::wire {

inline const char* reason(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Content Too Large";
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

// A JSON string's contents, ASCII only: what json.dumps (ensure_ascii) writes for ASCII input;
// other bytes as \u00XX.
inline void json_escape(std::string& out, std::string_view s) {
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c >= 0x7f) {  // keep the body ASCII whatever bytes a request held
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
}

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
